// The row kernels for float32 rows with a bfloat16 target and the reverse (softmax_rows_pairs.cuh).
#define KL_EXT_PAIRS(X) X(float, c10::BFloat16) X(c10::BFloat16, float)
#include "softmax_rows_pairs.cuh"
