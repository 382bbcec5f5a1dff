// The registry of the compiled ops' settings (ops/config.h) and its three ops.
#include "ops/config.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <sstream>

namespace tlkernels {
namespace config {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, Setting*> settings;
};
Registry& registry() {
  static Registry r;
  return r;
}

std::string joined(const std::vector<std::string>& v) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  return os.str();
}

}  // namespace

Setting::Setting(const char* name, std::vector<std::string> choices) : name_(name), choices_(std::move(choices)) {
  TORCH_CHECK(!choices_.empty(), "tlkernels config: setting ", name_, " declared without choices");
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  TORCH_CHECK(r.settings.emplace(name_, this).second, "tlkernels config: setting ", name_, " declared twice");
}

int Setting::find(const std::string& v) const {
  for (size_t i = 0; i < choices_.size(); ++i)
    if (choices_[i] == v) return static_cast<int>(i);
  return -1;
}

void set(const std::vector<std::pair<std::string, std::string>>& values) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::pair<Setting*, int>> todo;
  for (const auto& kv : values) {
    auto it = r.settings.find(kv.first);
    TORCH_CHECK(it != r.settings.end(), "tlkernels config: no compiled setting is named '", kv.first, "'");
    const int i = it->second->find(kv.second);
    TORCH_CHECK_VALUE(i >= 0, "tlkernels config: ", kv.first, " must be one of ", joined(it->second->choices()),
                      "; got '", kv.second, "'");
    todo.emplace_back(it->second, i);
  }
  for (const auto& t : todo) t.first->set_index(t.second);
}

namespace {

// [name, value, name, value, ...] in, nothing out.
void set_config(const std::vector<std::string>& entries) {
  TORCH_CHECK_VALUE(entries.size() % 2 == 0, "_set_config: entries must be [name, value, ...] pairs, got ",
                    entries.size(), " strings");
  std::vector<std::pair<std::string, std::string>> values;
  for (size_t i = 0; i < entries.size(); i += 2) values.emplace_back(entries[i], entries[i + 1]);
  set(values);
}

// [name, value, ...]: the current values.
std::vector<std::string> get_config() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> out;
  for (const auto& kv : r.settings) {
    out.push_back(kv.first);
    out.push_back(kv.second->value());
  }
  return out;
}

// [name, "choice,choice,...", ...]: each setting's choices, the default first.
std::vector<std::string> config_choices() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> out;
  for (const auto& kv : r.settings) {
    std::string s;
    for (const auto& c : kv.second->choices()) s += (s.empty() ? "" : ",") + c;
    out.push_back(kv.first);
    out.push_back(s);
  }
  return out;
}

}  // namespace
}  // namespace config
}  // namespace tlkernels

TORCH_LIBRARY_FRAGMENT(tlkernels, m) {
  m.def("_set_config(str[] entries) -> ()", &tlkernels::config::set_config);
  m.def("_config() -> str[]", &tlkernels::config::get_config);
  m.def("_config_choices() -> str[]", &tlkernels::config::config_choices);
}
