// How one slice_moments call is cut into work: built on the host from shapes and views only, cached,
// and shared by the CPU and CUDA kernels.
//
// A view (A, K, B, offset, a_stride) of a tensor puts the flat elements offset + a*a_stride + k*B + b
// (a < A, b < B) into slice k; the whole-tensor view (A, K, B) is (A, K, B, 0, K*B).  Each tensor is read
// as a matrix [R, L] (its "layout"), chosen so that every view of the tensor maps to either
//   * a COL view: a_stride == L (or A == 1) and the view's K*B elements of a row are the columns
//     [col0, col0 + K*B) of rows [row0, row0 + A); slice k = the columns [col0 + k*B, col0 + (k+1)*B)
//     (columns of a Linear weight, input channels of a conv, flatten blocks, a block of columns of a
//     fused weight), or
//   * a RUN view: L divides offset, a_stride and B; rows [row0, row1) with row0 = offset / L hold the
//     view, row r at u = r - row0 belongs to it when u % stride < K*period (stride = a_stride / L, period
//     = B / L) and then to slice (u % stride) / period (rows of a weight, the whole tensor, the rows of one
//     head of a fused projection).
// One read of the matrix then yields per-column sums over rows (COL views) and per-row totals over
// columns (RUN views).  Views that do not fit the chosen layout go to a second entry for the same
// tensor (a second read; rare, and the planner picks the layout that covers the most views).
//
// The matrix is cut into rectangular items (the unit of parallel work), also at the first and last row
// of every partial view, so that each item lies inside or outside each view's rows.  An item lists the
// views it touches (item_views; rows no view covers are not read at all) and folds its column sums and
// row totals into "slots": one per (item, view, slice touched).  A slot is written only by its item, and
// a CSR table lists, for every output row, its slots in item order, so the final per-slice sums are
// deterministic and no second pass over the data is needed.
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

// Values per view in the op's flat view table: (tensor, A, K, B, offset, a_stride).
constexpr int64_t kViewFields = 6;

// Numbers every record starts with, so one int64 blob can carry all tables to the device.
struct EntryRec {          // one read of one tensor
  int64_t tensor;          // index into xs
  int64_t R, L;            // layout
};

struct ViewRec {           // one view placed in an entry's layout
  int64_t kind;            // kCol or kRun
  int64_t K, B;
  int64_t period;          // kRun: B / L; kCol: unused (0)
  int64_t stride;          // kRun: rows from one a to the next (a_stride / L); kCol: unused (0)
  int64_t row0, row1;      // the rows [row0, row1) that hold the view
  int64_t col0;            // kCol: first column of slice 0; kRun: 0
  int64_t out_row;         // first output row of this view
};

struct ItemRec {           // a rectangle rows [r0, r1) x cols [c0, c1) of one entry
  int64_t entry;
  int64_t r0, r1, c0, c1;
  int64_t has_col, has_run;          // whether it folds column sums / row totals into any view
  int64_t view_begin, view_end;      // its views: item_views[view_begin : view_end] (RUN views first)
  int64_t slot_begin;                // slots of this item: slot_begin + (view's offset inside the item)
  int64_t run_slot_begin, run_slot_end;  // the item's kRun slots, zeroed when the item starts
};

// For view v of item i: its slots are slot(i, v) + idx, idx < count(i, v), laid out in the order of the
// item's views.  The slice of slot idx is first_slice(v, item) + idx (kCol), or (first_slice + idx) % K
// (kRun: the blocks (a, k) an item meets run k0, k0+1, ..., K-1, 0, 1, ... in row order).
struct Plan {
  std::vector<EntryRec> entries;
  std::vector<ViewRec> views;
  std::vector<ItemRec> items;
  std::vector<int64_t> item_views;  // indices into views
  int64_t num_slots = 0;
  int64_t num_rows = 0;            // output rows
  std::vector<int64_t> row_ptr;    // [num_rows + 1]
  std::vector<int64_t> row_slots;  // slots of output row o: row_slots[row_ptr[o] : row_ptr[o+1]]
  int64_t max_item_rows = 0;
};

// Work-size settings: the CPU wants big items (few threads, L2-sized tiles), the GPU many.
struct PlanConfig {
  int64_t col_width;       // widest item when the entry has COL views (per-column accumulators)
  int64_t run_width;       // widest item when it has only RUN views
  int64_t item_elems;      // target elements per item
  int64_t col_min_rows;    // lower bound on item rows with COL views (amortises the column slots)
};

// views_flat: kViewFields-tuples (tensor, A, K, B, offset, a_stride), checked (ops.cpp) and sorted by
// tensor; numels: per tensor.
std::shared_ptr<const Plan> get_plan(const std::vector<int64_t>& numels,
                                     const std::vector<int64_t>& views_flat,
                                     const PlanConfig& config);

// The blocks (a, k) of RUN view v met by rows [rs, re): global block numbers a*K + k in [first, last];
// returns their number (0 when none; then first and last are unspecified).
NMX_HOST_DEVICE inline int64_t run_blocks(const ViewRec& v, int64_t rs, int64_t re, int64_t& first, int64_t& last) {
  const int64_t span = v.K * v.period;  // rows of one a that belong to the view
  int64_t u0 = (rs > v.row0 ? rs : v.row0) - v.row0;
  int64_t u1 = (re < v.row1 ? re : v.row1) - v.row0 - 1;
  if (u0 > u1) return 0;
  if (u0 % v.stride >= span) u0 = (u0 / v.stride + 1) * v.stride;      // skip to the next a
  if (u1 % v.stride >= span) u1 = (u1 / v.stride) * v.stride + span - 1;  // back to this a's last row
  if (u0 > u1) return 0;
  first = (u0 / v.stride) * v.K + (u0 % v.stride) / v.period;
  last = (u1 / v.stride) * v.K + (u1 % v.stride) / v.period;
  return last - first + 1;
}

// Number of slots of view `v` inside an item with rows [r0, r1) and columns [c0, c1), and the slice of its
// first slot.  (A COL view of an item always holds all of the item's rows.)
NMX_HOST_DEVICE inline int64_t slots_in_item(const ViewRec& v, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                                             int64_t* first_slice = nullptr) {
  if (v.kind == kCol) {
    const int64_t end = v.col0 + v.K * v.B;
    const int64_t cs = c0 > v.col0 ? c0 : v.col0, ce = c1 < end ? c1 : end;
    if (cs >= ce) return 0;
    if (first_slice) *first_slice = (cs - v.col0) / v.B;
    return (ce - 1 - v.col0) / v.B - (cs - v.col0) / v.B + 1;
  }
  int64_t first = 0, last = 0;
  const int64_t blocks = run_blocks(v, r0, r1, first, last);
  if (first_slice) *first_slice = blocks > 0 ? first % v.K : 0;
  return blocks < v.K ? blocks : v.K;
}

}  // namespace nmx
