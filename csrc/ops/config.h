#pragma once
// The settings the compiled ops read (a strategy, a path, an instruction-set cap), each declared once beside
// the code that reads it:
//   const config::Setting kHistogramSetting("histogram", {"auto", "heuristic", "separable", "direct"});
// The first choice is the default. Values are set through one op, `_set_config(str[] entries)` (name, value
// pairs; tlkernels/config.py pushes the environment's values at import and on override()), which checks every
// value against its setting's choices before changing any; `_config_choices()` lists each setting's choices
// for Python, so that the names live here only. C++ users call the op through the dispatcher or config::set().
#include <atomic>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace tlkernels {
namespace config {

class Setting {
 public:
  Setting(const char* name, std::vector<std::string> choices);
  Setting(const Setting&) = delete;
  Setting& operator=(const Setting&) = delete;

  const std::string& name() const { return name_; }
  const std::vector<std::string>& choices() const { return choices_; }
  // the current value (one relaxed atomic load: cheap enough for every call)
  int index() const { return index_.load(std::memory_order_relaxed); }
  const std::string& value() const { return choices_[index()]; }
  bool is(const char* v) const { return value() == v; }
  // the index of choice `v` (-1 when it is none)
  int find(const std::string& v) const;
  void set_index(int i) { index_.store(i, std::memory_order_relaxed); }

 private:
  std::string name_;
  std::vector<std::string> choices_;
  std::atomic<int> index_{0};
};

// Sets name=value pairs, checked as a whole first (an unknown name or value changes nothing).
void set(const std::vector<std::pair<std::string, std::string>>& values);

}  // namespace config
}  // namespace tlkernels
