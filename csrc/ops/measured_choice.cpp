// The process's measured picks (ops/measured_choice.h) as data for tlkernels/_choices.py, which saves them
// to and loads them from disk (TLKERNELS_CHOICE_CACHE): entries are flattened [key, name, key, name, ...]. And
// the table, rounds and rule for the Python ops' measured choices (tlkernels/_timing.py), which time callables
// the compiled library cannot call.
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops/measured_choice.h"

namespace tlkernels {
namespace {

std::vector<std::string> measured_choices() {
  auto& table = choice_table();
  std::lock_guard<std::mutex> lock(table.mu);
  std::vector<std::string> out;
  out.reserve(2 * table.picks.size());
  for (const auto& kv : table.picks) {
    out.push_back(kv.first);
    out.push_back(kv.second);
  }
  return out;
}

std::vector<std::string> measured_choice_names() {
  auto& table = choice_table();
  std::lock_guard<std::mutex> lock(table.mu);
  return std::vector<std::string>(table.names.begin(), table.names.end());
}

void set_measured_choices(const std::vector<std::string>& entries) {
  TORCH_CHECK(entries.size() % 2 == 0, "_set_measured_choices: entries must be [key, name, ...] pairs, got ",
              entries.size(), " strings");
  auto& table = choice_table();
  std::lock_guard<std::mutex> lock(table.mu);
  for (size_t i = 0; i < entries.size(); i += 2) table.picks[entries[i]] = entries[i + 1];
}

void register_choice_names(const std::vector<std::string>& names) {
  auto& table = choice_table();
  std::lock_guard<std::mutex> lock(table.mu);
  table.names.insert(names.begin(), names.end());
}

// key's recorded pick among the candidates, "" for none.
std::string recorded_choice(const std::string& key, const std::vector<std::string>& names) {
  const int r = recorded_index(key, names);
  return r < 0 ? std::string() : names[static_cast<size_t>(r)];
}

std::string record_choice(const std::string& key, const std::vector<std::string>& names, std::vector<double> best,
                          int64_t keep, std::optional<double> clearly_faster, int64_t naive) {
  const auto n = static_cast<int64_t>(names.size());
  TORCH_CHECK_VALUE(n > 0 && static_cast<int64_t>(best.size()) == n && keep >= 0 && keep < n && naive >= -1 &&
                        naive < n,
                    "_measured_choice_record: needs one time per candidate, keep among them and naive among them or "
                    "-1, got ", n, " candidates, ", best.size(), " times, keep ", keep, ", naive ", naive);
  return names[record_pick(key, names, best, static_cast<size_t>(keep), static_cast<int>(naive),
                           clearly_faster.value_or(kClearlyFaster))];
}

std::vector<int64_t> rounds() { return {kRounds, kWarmupRounds}; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def("_measured_choice_register_names(str[] names) -> ()", &register_choice_names);
  m.def("_measured_choice_recorded(str key, str[] candidates) -> str", &recorded_choice);
  m.def("_measured_choice_record(str key, str[] candidates, float[] times, int keep, float? clearly_faster, "
        "int naive=-1) -> str",
        &record_choice);
  m.def("_measured_choice_rounds() -> int[]", &rounds);
  m.def("_measured_choices() -> str[]", &measured_choices);
  m.def("_set_measured_choices(str[] entries) -> ()", &set_measured_choices);
  m.def("_measured_choice_names() -> str[]", &measured_choice_names);
}

}  // namespace tlkernels
