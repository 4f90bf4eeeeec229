// The scheduler of the host CUDA emulation (emulation.h): one block at a time, its threads as fibers on
// the calling OS thread, switched only at barriers and warp shuffles, in a seeded order.
#include "emulation.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace nmx {
namespace emu {

thread_local uint3 thread_idx, block_idx;
thread_local dim3 block_dim, grid_dim;

namespace {

constexpr int kWarp = 32;
constexpr std::size_t kStackBytes = 128 * 1024;  // kernels keep tens of doubles per thread

// Fiber stacks with a guard page below each, kept per OS thread and reused by every launch.
class Stacks {
 public:
  void reserve(int n) {
    if (n > count_) grow(n);
  }
  char* get(int i) const { return base_ + std::size_t(i) * stride() + page(); }
  ~Stacks() {
    if (base_) munmap(base_, std::size_t(count_) * stride());
  }

 private:
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
  static std::size_t stride() { return kStackBytes + page(); }
  void grow(int n) {
    if (base_) munmap(base_, std::size_t(count_) * stride());
    base_ = nullptr, count_ = 0;
    void* p = mmap(nullptr, std::size_t(n) * stride(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot map fiber stacks");
    base_ = static_cast<char*>(p), count_ = n;
    for (int i = 0; i < n; ++i) mprotect(base_ + std::size_t(i) * stride(), page(), PROT_NONE);
  }
  char* base_ = nullptr;
  int count_ = 0;
};

// ---- fiber contexts ---------------------------------------------------------------------------------
// glibc's swapcontext also saves and restores the signal mask, a system call at every switch (about
// 250 ns, most of an emulated launch).  On x86-64 a switch saves just what the ABI asks a callee to
// keep (rbx, rbp, r12-r15, the SSE and x87 control words) and swaps stacks; elsewhere, ucontext.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(NMX_EMU_UCONTEXT)
extern "C" void nmx_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .pushsection .text
    .p2align 4
    .globl nmx_emu_switch
    .hidden nmx_emu_switch
    .type nmx_emu_switch, @function
nmx_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size nmx_emu_switch, .-nmx_emu_switch
    .popsection
)");

struct Context {
  void* sp = nullptr;
};

// A stack that nmx_emu_switch "returns" into entry() from, as if entry had been called (entry never
// returns: its return address is 0).
void make_context(Context& c, char* stack, std::size_t bytes, void (*entry)()) {
  uint64_t* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp, rbx, r12-r15
  uint32_t mxcsr;
  uint16_t x87;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(x87));
  --sp;
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &x87, 2);
  c.sp = sp;
}
void switch_context(Context& from, Context& to) { nmx_emu_switch(&from.sp, to.sp); }
[[noreturn]] void jump_context(Context& to) {
  void* abandoned;
  nmx_emu_switch(&abandoned, to.sp);
  __builtin_unreachable();
}
#else
struct Context {
  ucontext_t uc;
};
void make_context(Context& c, char* stack, std::size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
[[noreturn]] void jump_context(Context& to) {
  setcontext(&to.uc);
  std::abort();  // setcontext returns only when it fails
}
#endif

enum class State { kRunnable, kBarrier, kShuffle, kDone };

struct Fiber {
  Context ctx;
  uint3 idx;
  State state = State::kRunnable;
  uint64_t shuffles = 0;  // shuffles this thread has done: selects the exchange buffer
};

// One warp's exchange: two buffers, used by alternate shuffles, so that a lane may enter the next
// shuffle while slower lanes still read the previous one's values.
struct Exchange {
  uint64_t value[2][kWarp];
  int arrived[2] = {0, 0};
  Shuffle kind[2];
  int arg[2];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<int> runnable;
  std::vector<Exchange> warps;
  int at_barrier = 0, done = 0;
  int current = -1;
  uint64_t rng = 0;
};

// The launch in progress on this OS thread.
struct Launch {
  const std::function<void()>* body = nullptr;
  Context host;  // the launching context: resumed when a block ends or the launch fails
  Block block;
  std::string error;
};

thread_local Launch* active = nullptr;
thread_local Stacks stacks;

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

Launch& launch_state() {
  if (!active) throw std::logic_error("CUDA emulation: a device function was called outside emu::launch");
  return *active;
}

void set_coordinates(const Fiber& f) { thread_idx = f.idx; }

// Leaves the running fiber `self` (already marked with its new state) for a runnable fiber drawn at
// random, or for the host when the block is done.  Returns when `self` is resumed.
void schedule(Block& b, int self) {
  if (b.runnable.empty()) {
    if (b.done == int(b.fibers.size())) {
      switch_context(b.fibers[self].ctx, active->host);
      return;
    }
    int barrier = 0, shuffle = 0;
    for (const Fiber& f : b.fibers) barrier += f.state == State::kBarrier, shuffle += f.state == State::kShuffle;
    // Written straight into the launch: nothing on this fiber's stack is destroyed once it is left.
    active->error = "deadlock: " + std::to_string(barrier) + " threads wait at __syncthreads and " +
                    std::to_string(shuffle) + " at a warp shuffle, " + std::to_string(b.done) +
                    " have returned (a barrier or shuffle in divergent code)";
    fail(active->error.c_str());
  }
  const std::size_t pick = splitmix(b.rng) % b.runnable.size();
  const int next = b.runnable[pick];
  b.runnable[pick] = b.runnable.back();
  b.runnable.pop_back();
  b.current = next;
  set_coordinates(b.fibers[next]);
  if (next != self) switch_context(b.fibers[self].ctx, b.fibers[next].ctx);
}

void make_runnable(Block& b, int i) {
  b.fibers[i].state = State::kRunnable;
  b.runnable.push_back(i);
}

void fiber_main() {
  Launch& l = *active;
  // An exception cannot unwind past the fiber's first frame: it ends the launch instead.
  try {
    (*l.body)();
  } catch (const std::exception& e) {
    l.error = std::string("a thread threw: ") + e.what();
  }
  if (!l.error.empty()) fail(l.error.c_str());
  Block& b = l.block;
  const int self = b.current;
  b.fibers[self].state = State::kDone;
  ++b.done;
  if (b.at_barrier > 0 && b.done + b.at_barrier == int(b.fibers.size()))
    fail("a thread returned while others wait at __syncthreads (a barrier in divergent code)");
  schedule(b, self);  // never resumed: the block's fibers are made anew for the next block
  fail("a finished thread was resumed");
}

void run_block(Launch& l, const dim3& block, uint64_t seed, uint64_t linear_block) {
  Block& b = l.block;
  const int n = int(block.x * block.y * block.z);
  b.fibers.assign(n, Fiber{});
  b.warps.assign((n + kWarp - 1) / kWarp, Exchange{});
  b.runnable.resize(n);
  std::iota(b.runnable.begin(), b.runnable.end(), 0);
  b.at_barrier = 0, b.done = 0;
  stacks.reserve(n);
  b.rng = seed ^ (0xD1B54A32D192ED03ull * (linear_block + 1));
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.idx = uint3{unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / (block.x * block.y))};
    make_context(f.ctx, stacks.get(i), kStackBytes, fiber_main);
  }
  const std::size_t pick = splitmix(b.rng) % b.runnable.size();
  const int first = b.runnable[pick];
  b.runnable[pick] = b.runnable.back();
  b.runnable.pop_back();
  b.current = first;
  set_coordinates(b.fibers[first]);
  switch_context(l.host, b.fibers[first].ctx);
}

}  // namespace

void fail(const char* what) {
  Launch& l = launch_state();
  if (l.error.empty()) l.error = what;
  // Leave the fiber for good: its stack is reused by the next launch, and it holds nothing to destroy.
  jump_context(l.host);
}

void syncthreads() {
  Launch& l = launch_state();
  Block& b = l.block;
  const int self = b.current;
  b.fibers[self].state = State::kBarrier;
  if (++b.at_barrier + b.done == int(b.fibers.size())) {
    if (b.done > 0) fail("a thread returned while others wait at __syncthreads (a barrier in divergent code)");
    b.at_barrier = 0;
    for (int i = 0; i < int(b.fibers.size()); ++i) make_runnable(b, i);  // self included: drawn like any other
  }
  schedule(b, self);
}

uint64_t shuffle_bits(unsigned mask, uint64_t bits, Shuffle kind, int arg, int width) {
  Launch& l = launch_state();
  Block& b = l.block;
  const int self = b.current;
  Fiber& f = b.fibers[self];
  const int n = int(b.fibers.size());
  const int warp = self / kWarp, lane = self % kWarp;
  const int lanes = std::min(kWarp, n - warp * kWarp);
  if (mask != 0xffffffffu || lanes != kWarp) fail("warp shuffle without all 32 lanes (a partial mask or a partial warp)");
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) fail("warp shuffle width is not a power of two <= 32");
  Exchange& x = b.warps[warp];
  const int buf = int(f.shuffles++ & 1);
  if (x.arrived[buf] == 0) {
    x.kind[buf] = kind, x.arg[buf] = arg;
  } else if (x.kind[buf] != kind || x.arg[buf] != arg) {
    fail("the lanes of a warp disagree on a shuffle (a shuffle in divergent code)");
  }
  x.value[buf][lane] = bits;
  f.state = State::kShuffle;
  if (++x.arrived[buf] == kWarp) {
    x.arrived[buf] = 0;
    for (int i = warp * kWarp; i < warp * kWarp + kWarp; ++i) make_runnable(b, i);
  }
  schedule(b, self);
  // Every lane has written this shuffle's buffer; none can write it again before this lane reaches
  // its next shuffle (which uses the other buffer) and the one after.
  const int segment = lane - lane % width;
  int src = lane;
  if (kind == Shuffle::kXor) {
    src = lane ^ arg;
    if (src < segment || src >= segment + width) src = lane;  // outside its segment: CUDA keeps the own value
  } else if (lane % width + arg < width) {
    src = lane + arg;
  }
  return x.value[buf][src];
}

void launch(dim3 grid, dim3 block, uint64_t seed, const std::function<void()>& body) {
  if (active) throw std::logic_error("CUDA emulation: a launch inside a launch");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::invalid_argument("CUDA emulation: block of " + std::to_string(threads) + " threads");
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  Launch l;
  l.body = &body;
  active = &l;
  grid_dim = grid, block_dim = block;
  // Blocks in a seeded order: a kernel must not depend on the order in which blocks run.
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), 0);
  uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 1;
  for (uint64_t i = blocks; i > 1; --i) std::swap(order[i - 1], order[splitmix(rng) % i]);
  for (uint64_t k : order) {
    block_idx = uint3{unsigned(k % grid.x), unsigned(k / grid.x % grid.y), unsigned(k / (uint64_t(grid.x) * grid.y))};
    run_block(l, block, seed, k);
    if (!l.error.empty()) break;
  }
  active = nullptr;
  if (!l.error.empty()) throw std::runtime_error("CUDA emulation: " + l.error);
}

}  // namespace emu
}  // namespace nmx
