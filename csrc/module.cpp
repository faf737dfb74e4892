// The Python module glrec_fast._C. It exports no functions: importing it runs the static
// TORCH_LIBRARY_IMPL(glrec, CPU/CUDA, ...) registrations in the other csrc/ files, which attach the
// compiled kernels to the torch.ops.glrec.* schemas defined in glrec_fast/ops.py. Two attributes for
// glrec_fast._backend's checks at import: torch_version, the torch it was compiled against, and
// openmp, whether at::parallel_for runs on several threads in it (a compiler without OpenMP
// builds serial loops).
#include <torch/extension.h>

#define GLREC_STR_(x) #x
#define GLREC_STR(x) GLREC_STR_(x)
#ifndef GLREC_TORCH_VERSION
#error "setup.py defines GLREC_TORCH_VERSION (the torch this extension is built against)"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "glrec_fast compiled kernels; use them through torch.ops.glrec.* / glrec_fast.ops";
  m.attr("torch_version") = GLREC_STR(GLREC_TORCH_VERSION);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
