// The row kernels for bfloat16 rows (softmax_rows_pairs.cuh).
#define KL_EXT_PAIRS(X) X(c10::BFloat16, c10::BFloat16)
#include "softmax_rows_pairs.cuh"
