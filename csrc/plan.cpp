#include "plan.h"

#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <tuple>

namespace nmx {
namespace {

struct InView {
  int64_t K, B, out_row;
};

// Which kind view `v` takes in a layout of row length L, or -1 if it does not fit.
int64_t kind_in_layout(const InView& v, int64_t L) {
  if (v.B % L == 0) return kRun;      // also K*B == L with K == 1: a single key, no column sums
  if (v.K * v.B == L) return kCol;
  return -1;
}

// Pick the row length that places the most views; among those prefer rows that are not narrow (the
// kernels vectorise along rows), then fewer COL views (per-column accumulators cost registers and
// slots), then longer rows.
int64_t choose_layout(const std::vector<InView>& views, int64_t numel) {
  std::vector<int64_t> candidates;
  for (const auto& v : views) {
    candidates.push_back(v.K * v.B);
    candidates.push_back(v.B);
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

void add_tensor(Plan& plan, int64_t tensor, int64_t numel, std::vector<InView> pending,
                const PlanConfig& cfg) {
  while (!pending.empty()) {
    const int64_t L = choose_layout(pending, numel);
    EntryRec e{};
    e.tensor = tensor;
    e.R = numel / L;
    e.L = L;
    e.view_begin = static_cast<int64_t>(plan.views.size());
    std::vector<InView> rest;
    std::vector<ViewRec> runs, cols;
    for (const auto& v : pending) {
      int64_t kind = kind_in_layout(v, L);
      if (kind == kRun) runs.push_back({kRun, v.K, v.B, v.B / L, v.out_row});
      else if (kind == kCol) cols.push_back({kCol, v.K, v.B, 0, v.out_row});
      else rest.push_back(v);
    }
    // RUN views first, so that an item's RUN slots (zeroed when the item starts) are contiguous.
    for (auto* group : {&runs, &cols})
      for (const auto& v : *group) plan.views.push_back(v);
    e.view_end = static_cast<int64_t>(plan.views.size());
    e.has_run = !runs.empty();
    e.has_col = !cols.empty();
    plan.max_views_per_entry = std::max(plan.max_views_per_entry, e.view_end - e.view_begin);
    const int64_t entry = static_cast<int64_t>(plan.entries.size());
    plan.entries.push_back(e);

    const int64_t W = std::min(L, e.has_col ? cfg.col_width : cfg.run_width);
    int64_t H = std::max<int64_t>(1, cfg.item_elems / W);
    if (e.has_col) H = std::max(H, cfg.col_min_rows);
    H = std::min(H, e.R);
    plan.max_item_rows = std::max(plan.max_item_rows, H);
    for (int64_t r0 = 0; r0 < e.R; r0 += H) {
      for (int64_t c0 = 0; c0 < L; c0 += W) {
        ItemRec it{entry, r0, std::min(r0 + H, e.R), c0, std::min(c0 + W, L), plan.num_slots, 0, 0};
        it.run_slot_begin = it.slot_begin;
        int64_t n = 0;
        for (int64_t v = e.view_begin; v < e.view_end; ++v) {
          n += slots_in_item(plan.views[v], it.r0, it.r1, it.c0, it.c1);
          if (plan.views[v].kind == kRun) it.run_slot_end = it.slot_begin + n;
        }
        if (!e.has_run) it.run_slot_end = it.run_slot_begin;
        plan.num_slots += n;
        plan.items.push_back(it);
      }
    }
    pending.swap(rest);
  }
}

void build_csr(Plan& plan) {
  // (output row, slot) pairs in item order; a stable counting sort by row keeps that order per row.
  std::vector<int64_t> row_of_slot(plan.num_slots);
  for (const auto& it : plan.items) {
    const EntryRec& e = plan.entries[it.entry];
    int64_t slot = it.slot_begin;
    for (int64_t vi = e.view_begin; vi < e.view_end; ++vi) {
      const ViewRec& v = plan.views[vi];
      const int64_t count = slots_in_item(v, it.r0, it.r1, it.c0, it.c1);
      const int64_t k0 = v.kind == kCol ? it.c0 / v.B : (it.r0 / v.period) % v.K;
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
  for (size_t q = 0; q + 3 < views_flat.size(); q += 4) {
    const int64_t t = views_flat[q], K = views_flat[q + 2];
    // A view with one slice is the whole tensor whatever its A and B: (1, 1, N) lays out best.
    const int64_t B = K == 1 ? numels[t] : views_flat[q + 3];
    if (numels[t] > 0) per_tensor[t].push_back({K, B, row});  // empty tensors: rows stay zero
    row += K;
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
