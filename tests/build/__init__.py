"""Build checks, apart from the numerics: Triton ahead-of-time compilation for sm_80/sm_90,
`nvcc -Xptxas -v` of the CUDA kernels, the host C++ tile arithmetic, and importing the
package without (or with a broken) compiled library. None needs a GPU."""
