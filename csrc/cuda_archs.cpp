// The GPU architectures of this build (see cuda_archs.h). setup.py passes the build's
// TORCH_CUDA_ARCH_LIST as FUSED_RESNET_CUDA_ARCHS, with commas for its semicolons (which a compiler
// command line would not carry unquoted), e.g. -DFUSED_RESNET_CUDA_ARCHS=8.0,9.0a.

#include "cuda_archs.h"

#include <algorithm>
#include <cctype>
#include <sstream>
#include <string>

#ifndef FUSED_RESNET_CUDA_ARCHS
#error "FUSED_RESNET_CUDA_ARCHS (the build's TORCH_CUDA_ARCH_LIST) must be defined; setup.py does"
#endif
#define FUSED_RESNET_STRING(...) #__VA_ARGS__
#define FUSED_RESNET_EXPANDED_STRING(...) FUSED_RESNET_STRING(__VA_ARGS__)

namespace fused_resnet {
namespace {

enum class Runs { kYes, kNo, kUnknown };

// Whether machine code built for `arch` ("X.Y", "X.Ya", "X.Yf", each optionally "+PTX") runs on
// compute capability major.minor. "X.Y" code runs on devices of major X and minor >= Y, "X.Ya"
// (arch-specific) on X.Y only, "X.Yf" (family-specific) like "X.Y"; "+PTX" adds PTX, which the
// driver compiles for any newer device.
Runs runs_on(const std::string& arch, int64_t major, int64_t minor) {
  int arch_major = 0, arch_minor = 0;
  char suffix[8] = {0};
  std::istringstream in(arch);
  char dot = 0;
  if (!(in >> arch_major >> dot) || dot != '.' || !std::isdigit(in.peek())) {
    return Runs::kUnknown;  // e.g. a named arch ("Ampere"): not judged here
  }
  arch_minor = in.get() - '0';
  in.get(suffix, sizeof(suffix));
  const std::string rest(suffix);
  const bool specific = !rest.empty() && rest[0] == 'a';
  const bool family = !rest.empty() && rest[0] == 'f';
  const bool ptx = rest.find("+PTX") != std::string::npos;
  if (!rest.empty() && !specific && !family && rest != "+PTX") {
    return Runs::kUnknown;
  }
  if (specific) {
    return major == arch_major && minor == arch_minor ? Runs::kYes : Runs::kNo;
  }
  if (major == arch_major && minor >= arch_minor) {
    return Runs::kYes;
  }
  return ptx && !family && (major > arch_major || (major == arch_major && minor >= arch_minor)) ? Runs::kYes : Runs::kNo;
}

}  // namespace

std::string built_cuda_archs() {
  std::string archs = FUSED_RESNET_EXPANDED_STRING(FUSED_RESNET_CUDA_ARCHS);
  std::replace(archs.begin(), archs.end(), ',', ';');
  return archs;
}

std::string cuda_arch_unsupported_reason(int64_t major, int64_t minor) {
  const std::string archs = built_cuda_archs();
  std::istringstream list(archs);
  for (std::string arch; std::getline(list, arch, ';');) {
    if (runs_on(arch, major, minor) != Runs::kNo) {
      return "";
    }
  }
  std::ostringstream reason;
  reason << "fused_resnet._C has no machine code for compute capability " << major << "." << minor
         << " (sm_" << major << minor << "): it was built for TORCH_CUDA_ARCH_LIST=\"" << archs
         << "\"; rebuild it for this GPU with TORCH_CUDA_ARCH_LIST=\"" << archs << ";" << major << "." << minor
         << "\" make setup";
  return reason.str();
}

}  // namespace fused_resnet
