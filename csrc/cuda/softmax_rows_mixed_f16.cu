// The row kernels for float32 rows with a float16 target and the reverse (softmax_rows_pairs.cuh).
#define KL_EXT_PAIRS(X) X(float, c10::Half) X(c10::Half, float)
#include "softmax_rows_pairs.cuh"
