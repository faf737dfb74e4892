// The Python module glrec_fast._C. It exports no functions: importing it runs the static
// TORCH_LIBRARY_IMPL(glrec, CPU/CUDA, ...) registrations in the other csrc/ files, which attach the
// compiled kernels to the torch.ops.glrec.* schemas defined in glrec_fast/ops.py.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "glrec_fast compiled kernels; use them through torch.ops.glrec.* / glrec_fast.ops";
}
