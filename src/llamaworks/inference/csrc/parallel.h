// Threads for the decode kernels: at::parallel_for, or, inside lw::with_team, a team of spinning
// threads that lives for a whole decode step.
//
// Why: a decode step is dozens of short parallel sections (each product, each attention: 31 at the
// small preset), and an OpenMP region per section costs a team start, an end barrier and two futex
// wakes (~0.8 us on Zen 4, against 0.1 us for a hand-off through two atomics). llamaworks::decode_step
// runs its whole step in one region instead: thread 0 runs the step as before and hands each section
// it meets to the others (llama.cpp's graph compute works the same way: one pool, spin barriers).
// While thread 0 does the serial work between sections (~24% of small's fp32 step), the others read
// their share of the next product's weight into their caches (prefetch_next). Step alone, Zen 4:
// small fp32 1.05-1.10x, A and base fp32 1.03x (docs/inference.md). LLAMAWORKS_DECODE_TEAM=0: off.
//
// lw::parallel_for(begin, end, grain, f) splits [begin, end) exactly as at::parallel_for does
// (the same number of threads for a grain, the same chunks in thread order), so a kernel's
// results do not depend on which of the two ran it.
#pragma once
#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace lw {

using RangeFn = c10::function_ref<void(int64_t, int64_t)>;

// f over [begin, end) in chunks: on the calling thread's team inside with_team, else at::parallel_for.
void parallel_for(int64_t begin, int64_t end, int64_t grain, RangeFn f);

// Inside with_team, on thread 0: the next section will read these bytes (a weight); the other
// threads read their shares into their caches while thread 0 works alone. Else nothing.
void prefetch_next(const void* p, int64_t bytes);

// body() on this thread with the other threads of one parallel region waiting on it for the
// sections that lw::parallel_for hands them. Exceptions from body (or a section) reach the caller
// once every thread has left the region. With one thread, more threads than the process's CPUs,
// or already inside a region, body() just runs (its sections then take at::parallel_for).
void with_team(c10::function_ref<void()> body);

}  // namespace lw
