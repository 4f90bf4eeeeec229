// The CPU item kernel for the compiler's baseline instruction set (any x86-64 or other processor).
#include "kernel_prelude.h"

#define NMX_ISA base
#define NMX_ISA_LEVEL 0
#include "kernel_impl.h"
