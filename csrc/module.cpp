// The Python module glrec_fast._C. It exports no functions: importing it runs the static
// TORCH_LIBRARY_IMPL(glrec, CPU/CUDA, ...) registrations in the other csrc/ files, which attach the
// compiled kernels to the torch.ops.glrec.* schemas defined in glrec_fast/ops.py. Two attributes for
// glrec_fast._backend's checks at import: torch_version, the torch it was compiled against, and
// openmp, whether at::parallel_for runs on several threads in it (a compiler without OpenMP
// builds serial loops). One function, one_thread_here(), for the sampler's worker thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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
  // The calling thread's intra-op work (torch's CPU ops and these kernels) runs on this thread alone
  // from now on; every other thread, and the thread count torch gives new threads, stay as they were.
  // torch.set_num_threads cannot do that: it also sets the process default, and each thread
  // re-reads that default on its first parallel op -- once inside libtorch and once inside this
  // module (each keeps its own first-use flag). Both first uses are made here before the thread's
  // OpenMP setting is lowered. (This module's parallel_for asks libtorch for the thread count, which
  // makes libtorch's first use too; the zeros make it regardless.) Used for the sampler's worker
  // (sampling.Prefetcher), whose second thread team only contended with the training thread's.
  m.def("one_thread_here", []() {
    at::zeros({1 << 16}).sum();                 // a parallel op inside libtorch: its first use
    at::parallel_for(0, 2, 1, [](int64_t, int64_t) {});   // and this module's
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
  });
}
