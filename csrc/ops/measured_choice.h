#pragma once
// The measured choice among exact paths of an op (cuDNN benchmark mode's idea), shared by the gated
// convolution's strategies and the histogram's paths: each candidate is timed once per call signature `key`
// and the pick is cached for the process.
#include <algorithm>
#include <chrono>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace tlkernels {

// `keep` (the fixed rule's pick, one of `cands`) stays unless another is clearly faster: a candidate timed
// alone, right after another one has filled the caches, can look a few percent better or worse than it runs
// inside a model, and a choice that flips with that noise would cost more than it gains.
constexpr double kClearlyFaster = 0.85;

// run(c) runs candidate c once. Round 0 warms up (first oneDNN primitives, scratch buffers); then the best of
// three rounds, interleaved so that a burst of load on the machine hits every candidate alike.
template <class T, class Run>
T measured_choice(const std::string& key, const std::vector<T>& cands, T keep, const Run& run) {
  static std::mutex mu;
  static std::unordered_map<std::string, T> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  std::vector<double> best(cands.size(), 1e300);
  for (int round = 0; round < 4; ++round)
    for (size_t i = 0; i < cands.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      run(cands[i]);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round > 0) best[i] = std::min(best[i], dt);
    }
  size_t w = 0;
  for (size_t i = 0; i < cands.size(); ++i)
    if (cands[i] == keep) w = i;
  for (size_t i = 0; i < cands.size(); ++i)
    if (best[i] < kClearlyFaster * best[w]) w = i;
  std::lock_guard<std::mutex> lock(mu);
  return cache.emplace(key, cands[w]).first->second;
}

}  // namespace tlkernels
