// The op schemas of the native kernels. CPU implementations live in cpu/, CUDA ones in cuda/.
//
// The Python package registers the differentiable `dpo_kernels::token_logps` (with its autograd and
// fake implementations) and calls these ops for backend="native"; they are also usable on their own.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dpo_kernels, m) {
  // -> (logp, lse, stats): logp (N, T - shift), fp32 (fp64 for fp64 logits), and lse (N, T - shift, 2) in
  // that dtype, the log-sum-exp as (row max m, log sum_v exp(z_v - m)) for the backward; zeros on unscored
  // rows. stats, in the same dtype, is (N, T - shift, 4) with with_stats (the columns of
  // dpo_kernels.reference.STATS: sum_logits, entropy, top1, lse2; computed in the same pass over the
  // logits, zeros on unscored rows), else an empty (N, T - shift, 0).
  //
  // vocab_start (every op): the logits' V columns are the vocabulary ids [vocab_start, vocab_start + V) and
  // the labels are global ids, so a vocabulary sharded over devices or chunks is scored shard by shard.
  // A label outside the window scores as a label logit of 0 (common.h): the lse and stats are the
  // window's, which merge into the whole vocabulary's.
  m.def(
      "native_token_logps(Tensor logits, Tensor labels, int ignore_index, bool shift, bool with_stats=False, "
      "int vocab_start=0) -> (Tensor, Tensor, Tensor)");
  // -> the gradient w.r.t. logits: grad_logp * (onehot(label) - softmax(logits)), in the logits' dtype,
  // the softmax formed from the given lse: for a window, the whole vocabulary's (m, log s), so the result
  // is the window's columns of the whole gradient.
  m.def(
      "native_token_logps_backward(Tensor grad_logp, Tensor logits, Tensor labels, Tensor lse, int ignore_index, "
      "bool shift, int vocab_start=0) -> Tensor");
  // The same gradient written into the logits' own storage.
  m.def(
      "native_token_logps_backward_(Tensor grad_logp, Tensor(a!) logits, Tensor labels, Tensor lse, "
      "int ignore_index, bool shift, int vocab_start=0) -> ()");
}

// `import dpo_kernels._C` loads this library, which registers the ops; the module itself is empty.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
