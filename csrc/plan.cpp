#include "plan.h"

#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <tuple>

namespace nmx {
namespace {

// One view as the caller gave it, canonical: a_stride == K*B when A == 1 (it is then meaningless).
struct InView {
  int64_t A, K, B, offset, a_stride, out_row;
};

// Which kind view `v` takes in a layout of row length L, or -1 if it does not fit.
int64_t kind_in_layout(const InView& v, int64_t L) {
  // RUN first: also K*B == L with K == 1 (a single key, no column sums).
  if (v.B % L == 0 && v.offset % L == 0 && v.a_stride % L == 0) return kRun;
  if ((v.A == 1 || v.a_stride == L) && v.offset % L + v.K * v.B <= L) return kCol;
  return -1;
}

int64_t gcd(int64_t a, int64_t b) {
  while (b) a %= b, std::swap(a, b);
  return a;
}

// Pick the row length that places the most views; among those prefer rows that are not narrow (the
// kernels vectorise along rows), then fewer COL views (per-column accumulators cost registers and
// slots), then longer rows.  Candidates: each view's widest RUN row (which always fits it) and its COL
// row (K*B for a whole view, a_stride for part of one, the tensor for a single row).
int64_t choose_layout(const std::vector<InView>& views, int64_t numel) {
  std::vector<int64_t> candidates;
  for (const auto& v : views) {
    candidates.push_back(gcd(gcd(gcd(v.B, v.offset), v.a_stride), numel));
    candidates.push_back(v.A == 1 ? v.K * v.B : v.a_stride);
    if (v.A == 1) candidates.push_back(numel);
  }
  int64_t best_L = -1;
  std::tuple<int64_t, int64_t, int64_t, int64_t> best{-1, 0, 0, 0};
  for (int64_t L : candidates) {
    if (L <= 0 || numel % L != 0) continue;
    int64_t covered = 0, cols = 0;
    for (const auto& v : views) {
      int64_t k = kind_in_layout(v, L);
      covered += k >= 0;
      cols += k == kCol;
    }
    auto score = std::make_tuple(covered, int64_t(L >= 64 || L == numel), -cols, L);
    if (score > best) {
      best = score;
      best_L = L;
    }
  }
  return best_L;
}

ViewRec place(const InView& v, int64_t kind, int64_t L) {
  ViewRec r{};
  r.kind = kind;
  r.K = v.K, r.B = v.B, r.out_row = v.out_row;
  r.row0 = v.offset / L;
  if (kind == kRun) {
    r.period = v.B / L;
    r.stride = v.a_stride / L;
    r.row1 = r.row0 + (v.A - 1) * r.stride + v.K * r.period;
  } else {
    r.col0 = v.offset % L;
    r.row1 = r.row0 + v.A;
  }
  return r;
}

// Rows at which items must start: 0, the row ranges of every view, R.  Between two of them, items are
// `H` rows tall (the last one shorter).
std::vector<int64_t> row_cuts(const Plan& plan, int64_t vb, int64_t ve, int64_t R, int64_t H) {
  std::vector<int64_t> bounds{0, R};
  for (int64_t vi = vb; vi < ve; ++vi) bounds.push_back(plan.views[vi].row0), bounds.push_back(plan.views[vi].row1);
  std::sort(bounds.begin(), bounds.end());
  bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());
  std::vector<int64_t> cuts;
  for (size_t i = 0; i + 1 < bounds.size(); ++i)
    for (int64_t r = bounds[i]; r < bounds[i + 1]; r += H) cuts.push_back(r);
  cuts.push_back(R);
  return cuts;
}

// The item's views (those it holds elements of), its slots, and its has_col / has_run.
void add_item(Plan& plan, ItemRec it, int64_t vb, int64_t ve) {
  it.view_begin = static_cast<int64_t>(plan.item_views.size());
  it.slot_begin = it.run_slot_begin = it.run_slot_end = plan.num_slots;
  int64_t n = 0;
  for (int64_t vi = vb; vi < ve; ++vi) {  // the entry's views: RUN first
    const ViewRec& v = plan.views[vi];
    if (v.kind == kCol && (it.r0 < v.row0 || it.r1 > v.row1)) continue;  // outside its rows (cuts)
    const int64_t count = slots_in_item(v, it.r0, it.r1, it.c0, it.c1);
    if (count == 0) continue;
    plan.item_views.push_back(vi);
    n += count;
    if (v.kind == kRun) it.has_run = 1, it.run_slot_end = it.slot_begin + n;
    else it.has_col = 1;
  }
  it.view_end = static_cast<int64_t>(plan.item_views.size());
  if (n == 0) return;  // no view reads these elements
  plan.num_slots += n;
  plan.max_item_rows = std::max(plan.max_item_rows, it.r1 - it.r0);
  plan.items.push_back(it);
}

void add_tensor(Plan& plan, int64_t tensor, int64_t numel, std::vector<InView> pending,
                const PlanConfig& cfg) {
  while (!pending.empty()) {
    const int64_t L = choose_layout(pending, numel);
    EntryRec e{tensor, numel / L, L};
    const int64_t vb = static_cast<int64_t>(plan.views.size());
    std::vector<InView> rest;
    std::vector<ViewRec> runs, cols;
    for (const auto& v : pending) {
      int64_t kind = kind_in_layout(v, L);
      if (kind == kRun) runs.push_back(place(v, kRun, L));
      else if (kind == kCol) cols.push_back(place(v, kCol, L));
      else rest.push_back(v);
    }
    // RUN views first, so that an item's RUN slots (zeroed when the item starts) are contiguous.
    for (auto* group : {&runs, &cols})
      for (const auto& v : *group) plan.views.push_back(v);
    const int64_t ve = static_cast<int64_t>(plan.views.size());
    const int64_t entry = static_cast<int64_t>(plan.entries.size());
    plan.entries.push_back(e);

    const int64_t W = std::min(L, !cols.empty() ? cfg.col_width : cfg.run_width);
    int64_t H = std::max<int64_t>(1, cfg.item_elems / W);
    if (!cols.empty()) H = std::max(H, cfg.col_min_rows);
    H = std::min(H, e.R);
    const std::vector<int64_t> cuts = row_cuts(plan, vb, ve, e.R, H);
    for (size_t i = 0; i + 1 < cuts.size(); ++i)
      for (int64_t c0 = 0; c0 < L; c0 += W)
        add_item(plan, ItemRec{entry, cuts[i], cuts[i + 1], c0, std::min(c0 + W, L)}, vb, ve);
    pending.swap(rest);
  }
}

void build_csr(Plan& plan) {
  // (output row, slot) pairs in item order; a stable counting sort by row keeps that order per row.
  std::vector<int64_t> row_of_slot(plan.num_slots);
  for (const auto& it : plan.items) {
    int64_t slot = it.slot_begin;
    for (int64_t q = it.view_begin; q < it.view_end; ++q) {
      const ViewRec& v = plan.views[plan.item_views[q]];
      int64_t k0 = 0;
      const int64_t count = slots_in_item(v, it.r0, it.r1, it.c0, it.c1, &k0);
      for (int64_t idx = 0; idx < count; ++idx)
        row_of_slot[slot++] = v.out_row + (v.kind == kCol ? k0 + idx : (k0 + idx) % v.K);
    }
  }
  plan.row_ptr.assign(plan.num_rows + 1, 0);
  for (int64_t r : row_of_slot) ++plan.row_ptr[r + 1];
  for (int64_t o = 0; o < plan.num_rows; ++o) plan.row_ptr[o + 1] += plan.row_ptr[o];
  plan.row_slots.resize(plan.num_slots);
  std::vector<int64_t> fill(plan.row_ptr.begin(), plan.row_ptr.end() - 1);
  for (int64_t s = 0; s < plan.num_slots; ++s) plan.row_slots[fill[row_of_slot[s]]++] = s;
}

std::shared_ptr<const Plan> build_plan(const std::vector<int64_t>& numels,
                                       const std::vector<int64_t>& views_flat, const PlanConfig& cfg) {
  auto plan = std::make_shared<Plan>();
  std::vector<std::vector<InView>> per_tensor(numels.size());
  int64_t row = 0;
  for (size_t q = 0; q + kViewFields <= views_flat.size(); q += kViewFields) {
    const int64_t* f = views_flat.data() + q;
    const int64_t t = f[0], N = numels[t];
    InView v{f[1], f[2], f[3], f[4], f[1] == 1 ? f[2] * f[3] : f[5], row};
    // A view with one slice is the whole tensor whatever its A and B: (1, 1, N) lays out best.
    if (v.K == 1 && v.offset == 0 && v.a_stride == v.B && v.A * v.B == N) v = {1, 1, N, 0, N, row};
    if (v.A > 0 && v.K > 0 && v.B > 0) per_tensor[t].push_back(v);  // empty views: rows stay zero
    row += v.K;
  }
  plan->num_rows = row;
  for (size_t t = 0; t < numels.size(); ++t)
    if (!per_tensor[t].empty()) add_tensor(*plan, static_cast<int64_t>(t), numels[t], per_tensor[t], cfg);
  build_csr(*plan);
  return plan;
}

}  // namespace

std::shared_ptr<const Plan> get_plan(const std::vector<int64_t>& numels,
                                     const std::vector<int64_t>& views_flat, const PlanConfig& cfg) {
  // Training calls the op with the same shapes every step: keep the last few plans.
  using Key = std::vector<int64_t>;
  static std::mutex mutex;
  static std::list<std::pair<Key, std::shared_ptr<const Plan>>> cache;
  constexpr size_t kCapacity = 16;

  Key key{cfg.col_width, cfg.run_width, cfg.item_elems, cfg.col_min_rows,
          static_cast<int64_t>(numels.size())};
  key.insert(key.end(), numels.begin(), numels.end());
  key.insert(key.end(), views_flat.begin(), views_flat.end());
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (it->first == key) {
        cache.splice(cache.begin(), cache, it);
        return it->second;
      }
    }
  }
  auto plan = build_plan(numels, views_flat, cfg);
  std::lock_guard<std::mutex> lock(mutex);
  cache.emplace_front(std::move(key), plan);
  if (cache.size() > kCapacity) cache.pop_back();
  return plan;
}

}  // namespace nmx
