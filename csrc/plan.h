// How one slice_moments call is cut into work: built on the host from shapes and views only, cached,
// and shared by the CPU and CUDA kernels.
//
// Each tensor is read as a matrix [R, L] (its "layout"), chosen so that every view of the tensor maps
// to either
//   * a COL view: L == K*B, slice k = the columns [k*B, (k+1)*B) of every row (columns of a Linear
//     weight, input channels of a conv, flatten blocks, small vectors), or
//   * a RUN view: B % L == 0, slice k = the rows whose index r has (r / period) % K == k, period = B/L
//     (rows of a weight, the whole tensor).
// One read of the matrix then yields per-column sums over rows (COL views) and per-row totals over
// columns (RUN views).  Views that do not fit the chosen layout go to a second entry for the same
// tensor (a second read; rare, and the planner picks the layout that covers the most views).
//
// The matrix is cut into rectangular items (the unit of parallel work).  An item folds its column sums
// and row totals into "slots": one per (item, view, slice touched).  A slot is written only by its
// item, and a CSR table lists, for every output row, its slots in item order, so the final per-slice
// sums are deterministic and no second pass over the data is needed.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#if defined(__CUDACC__)
#define NMX_HOST_DEVICE __host__ __device__
#else
#define NMX_HOST_DEVICE
#endif

namespace nmx {

enum ViewKind : int64_t { kCol = 0, kRun = 1 };

// Numbers every record starts with, so one int64 blob can carry all tables to the device.
struct EntryRec {          // one read of one tensor
  int64_t tensor;          // index into xs
  int64_t R, L;            // layout
  int64_t has_col, has_run;
  int64_t view_begin, view_end;  // range in views
};

struct ViewRec {           // one view placed in an entry's layout
  int64_t kind;            // kCol or kRun
  int64_t K, B;
  int64_t period;          // kRun: B / L; kCol: unused (0)
  int64_t out_row;         // first output row of this view
};

struct ItemRec {           // a rectangle rows [r0, r1) x cols [c0, c1) of one entry
  int64_t entry;
  int64_t r0, r1, c0, c1;
  int64_t slot_begin;      // slots of this item: slot_begin + (view's offset inside the item)
  int64_t run_slot_begin, run_slot_end;  // the item's kRun slots, zeroed when the item starts
};

// For view v of item i: its slots are slot(i, v) + idx, idx < count(i, v); they are laid out in the
// order of the entry's views.  The slice of slot idx is:
//   kCol: k = c0 / B + idx;             kRun: k = (j0 % K + idx) % K with j0 = r0 / period.
struct Plan {
  std::vector<EntryRec> entries;
  std::vector<ViewRec> views;
  std::vector<ItemRec> items;
  int64_t num_slots = 0;
  int64_t num_rows = 0;            // output rows
  std::vector<int64_t> row_ptr;    // [num_rows + 1]
  std::vector<int64_t> row_slots;  // slots of output row o: row_slots[row_ptr[o] : row_ptr[o+1]]
  int64_t max_views_per_entry = 0;
  int64_t max_item_rows = 0;
};

// Work-size settings: the CPU wants big items (few threads, L2-sized tiles), the GPU many.
struct PlanConfig {
  int64_t col_width;       // widest item when the entry has COL views (per-column accumulators)
  int64_t run_width;       // widest item when it has only RUN views
  int64_t item_elems;      // target elements per item
  int64_t col_min_rows;    // lower bound on item rows with COL views (amortises the column slots)
};

// views_flat: quadruples (tensor, A, K, B) sorted by tensor; numels: per tensor.
std::shared_ptr<const Plan> get_plan(const std::vector<int64_t>& numels,
                                     const std::vector<int64_t>& views_flat,
                                     const PlanConfig& config);

// Number of slots of view `v` inside an item with rows [r0, r1) and columns [c0, c1).
NMX_HOST_DEVICE inline int64_t slots_in_item(const ViewRec& v, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  if (v.kind == kCol) return (c1 - 1) / v.B - c0 / v.B + 1;
  int64_t keys = (r1 - 1) / v.period - r0 / v.period + 1;
  return keys < v.K ? keys : v.K;
}

}  // namespace nmx
