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

// The pick among the candidates' measured times `best`: `keep` (an index) stays unless another is clearly
// faster; but a pick measured slower than the naive-equivalent candidate `naive` (an index: a path with the
// naive way's work, such as one library convolution over both weight sets; -1: none) gives way to the fastest,
// so that the choice is never measured slower than the naive way.
inline size_t pick_measured(const std::vector<double>& best, size_t keep, int naive) {
  size_t w = keep;
  for (size_t i = 0; i < best.size(); ++i)
    if (best[i] < kClearlyFaster * best[w]) w = i;
  if (naive >= 0 && best[w] > best[static_cast<size_t>(naive)])
    w = static_cast<size_t>(std::min_element(best.begin(), best.end()) - best.begin());
  return w;
}

// run(c) runs candidate c once; names[int(c)] names it. Round 0 warms up (first oneDNN primitives, scratch
// buffers); then the best of three rounds, interleaved so that a burst of load on the machine hits every
// candidate alike; pick_measured decides, `naive` naming the naive-equivalent candidate where there is one. A
// recorded pick that is not among `cands` (it does not apply here) is measured again.
template <class T, class Run>
T measured_choice(const std::string& key, const std::vector<T>& cands, T keep, const char* const* names,
                  const Run& run, std::optional<T> naive = std::nullopt) {
  auto& table = choice_table();
  auto recorded = [&](T& out) {
    auto it = table.picks.find(key);
    if (it == table.picks.end()) return false;
    for (T c : cands)
      if (it->second == names[static_cast<int>(c)]) {
        out = c;
        return true;
      }
    return false;
  };
  {
    std::lock_guard<std::mutex> lock(table.mu);
    T c;
    if (recorded(c)) return c;
  }
  std::vector<double> best(cands.size(), 1e300);
  for (int round = 0; round < 4; ++round)
    for (size_t i = 0; i < cands.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      run(cands[i]);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round > 0) best[i] = std::min(best[i], dt);
    }
  size_t k = 0;
  int n = -1;
  for (size_t i = 0; i < cands.size(); ++i) {
    if (cands[i] == keep) k = i;
    if (naive && cands[i] == *naive) n = static_cast<int>(i);
  }
  const size_t w = pick_measured(best, k, n);
  std::lock_guard<std::mutex> lock(table.mu);
  T c;
  if (recorded(c)) return c;  // (another thread measured the same signature meanwhile: one pick per key)
  table.picks[key] = names[static_cast<int>(cands[w])];
  return cands[w];
}

}  // namespace tlkernels
