// The process's measured picks (ops/measured_choice.h) as data for tlkernels/_choices.py, which saves them
// to and loads them from disk (TLKERNELS_CHOICE_CACHE): entries are flattened [key, name, key, name, ...].
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def("_measured_choices() -> str[]", &measured_choices);
  m.def("_set_measured_choices(str[] entries) -> ()", &set_measured_choices);
  m.def("_measured_choice_names() -> str[]", &measured_choice_names);
}

}  // namespace tlkernels
