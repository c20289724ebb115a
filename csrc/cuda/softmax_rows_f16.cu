// The row kernels for float16 rows (softmax_rows_pairs.cuh).
#define KL_EXT_PAIRS(X) X(c10::Half, c10::Half)
#include "softmax_rows_pairs.cuh"
