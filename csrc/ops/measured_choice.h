#pragma once
// The measured choice among exact paths of an op (cuDNN benchmark mode's idea), shared by the gated
// convolution's strategies and the histogram's paths: each candidate is timed once per call signature `key`
// and the pick is kept for the process, by name, in one table (choice_table) that tlkernels can save to disk
// and load in a later process on the same host (tlkernels/_choices.py, TLKERNELS_CHOICE_CACHE).
#include <algorithm>
#include <chrono>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace tlkernels {

// `keep` (the fixed rule's pick, one of `cands`) stays unless another is clearly faster: a candidate timed
// alone, right after another one has filled the caches, can look a few percent better or worse than it runs
// inside a model, and a choice that flips with that noise would cost more than it gains.
constexpr double kClearlyFaster = 0.85;

// Every measured pick of the process: call signature -> candidate name (ops/measured_choice.cpp reads and
// fills it for the Python side), and the names a pick may have (each op's candidates, registered once by
// ChoiceNames): a saved pick naming none of them is reported, not loaded.
struct ChoiceTable {
  std::mutex mu;
  std::unordered_map<std::string, std::string> picks;
  std::set<std::string> names;
};
inline ChoiceTable& choice_table() {
  static ChoiceTable t;
  return t;
}

// A static ChoiceNames beside an op's candidate names registers them: `static const ChoiceNames r(kNames);`.
struct ChoiceNames {
  template <size_t N>
  explicit ChoiceNames(const char* const (&names)[N]) {
    auto& table = choice_table();
    std::lock_guard<std::mutex> lock(table.mu);
    table.names.insert(names, names + N);
  }
};

// Against the naive-equivalent candidate a pick must be faster by this factor: within it, the two are equal
// to the timing's noise, and the naive way's work is taken.
constexpr double kBeatsNaive = 0.97;

// The pick among the candidates' measured times `best`: `keep` (an index) stays unless another is faster by the
// factor clearly_faster. Where a naive-equivalent candidate `naive` exists (an index: a path with the naive
// way's work, such as two library convolutions and a blend; -1: none), the pick must beat it by kBeatsNaive;
// otherwise the fastest candidate that does is taken, and `naive` itself when none does: the choice is never
// measured slower than the naive way.
inline size_t pick_measured(const std::vector<double>& best, size_t keep, int naive,
                            double clearly_faster = kClearlyFaster) {
  size_t w = keep;
  for (size_t i = 0; i < best.size(); ++i)
    if (best[i] < clearly_faster * best[w]) w = i;
  if (naive < 0) return w;
  const size_t n = static_cast<size_t>(naive);
  auto beats = [&](size_t i) { return i == n || best[i] <= kBeatsNaive * best[n]; };
  if (beats(w)) return w;
  w = n;
  for (size_t i = 0; i < best.size(); ++i)
    if (beats(i) && best[i] < best[w]) w = i;
  return w;
}

// How candidates are timed: round 0 warms up (first oneDNN primitives, scratch buffers), then the best of the
// other rounds, interleaved so that a burst of load on the machine hits every candidate alike.
constexpr int kRounds = 4;
constexpr int kWarmupRounds = 1;

// The measured times of candidates 0..n-1, run(i) running candidate i once.
template <class Run>
std::vector<double> time_candidates(size_t n, const Run& run) {
  std::vector<double> best(n, 1e300);
  for (int round = 0; round < kRounds; ++round)
    for (size_t i = 0; i < n; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      run(i);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round >= kWarmupRounds) best[i] = std::min(best[i], dt);
    }
  return best;
}

// The index of `key`'s recorded pick among the candidates' names, or -1 (none, or a pick that does not apply
// here: it is measured again). The caller holds the table's lock.
inline int recorded_index(const ChoiceTable& table, const std::string& key, const std::vector<std::string>& names) {
  const auto it = table.picks.find(key);
  if (it == table.picks.end()) return -1;
  for (size_t i = 0; i < names.size(); ++i)
    if (it->second == names[i]) return static_cast<int>(i);
  return -1;
}

inline int recorded_index(const std::string& key, const std::vector<std::string>& names) {
  auto& table = choice_table();
  std::lock_guard<std::mutex> lock(table.mu);
  return recorded_index(table, key, names);
}

// Decides among measured times (pick_measured) and records the pick for `key`, unless another thread recorded
// one meanwhile (one pick per key: that one is returned). Returns the pick's index.
inline size_t record_pick(const std::string& key, const std::vector<std::string>& names,
                          const std::vector<double>& best, size_t keep, int naive,
                          double clearly_faster = kClearlyFaster) {
  const size_t w = pick_measured(best, keep, naive, clearly_faster);
  auto& table = choice_table();
  std::lock_guard<std::mutex> lock(table.mu);
  const int r = recorded_index(table, key, names);
  if (r >= 0) return static_cast<size_t>(r);
  table.picks[key] = names[w];
  return w;
}

// The compiled ops' measured choice: run(c) runs candidate c once; names[int(c)] names it; `naive` names the
// naive-equivalent candidate where there is one. (The Python ops' twin, tlkernels/_timing.py, times its own
// callables and uses the same table, rounds and rule through the _measured_choice_* ops.)
template <class T, class Run>
T measured_choice(const std::string& key, const std::vector<T>& cands, T keep, const char* const* names,
                  const Run& run, std::optional<T> naive = std::nullopt) {
  std::vector<std::string> cand_names;
  size_t k = 0;
  int n = -1;
  for (size_t i = 0; i < cands.size(); ++i) {
    cand_names.push_back(names[static_cast<int>(cands[i])]);
    if (cands[i] == keep) k = i;
    if (naive && cands[i] == *naive) n = static_cast<int>(i);
  }
  const int r = recorded_index(key, cand_names);
  if (r >= 0) return cands[static_cast<size_t>(r)];
  const auto best = time_candidates(cands.size(), [&](size_t i) { run(cands[i]); });
  return cands[record_pick(key, cand_names, best, k, n)];
}

}  // namespace tlkernels
