// The fp16 instantiations of the Hopper conv kernels (see conv2d_cutlass_sm90.cuh); one file per
// element type, so that they compile in parallel.

#include "conv2d_cutlass_sm90.cuh"

#ifdef FUSED_RESNET_WITH_SM90
FUSED_RESNET_DEFINE_SM90_CONV(fp16, cutlass::half_t)
#endif
