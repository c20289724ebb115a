// The row kernels for float32 and float64 rows (softmax_rows_pairs.cuh).
#define KL_EXT_PAIRS(X) X(float, float) X(double, double)
#include "softmax_rows_pairs.cuh"
