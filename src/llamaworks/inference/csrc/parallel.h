// Threads for the decode kernels: at::parallel_for, or, inside lw::with_team, a team of spinning
// threads that lives for a whole decode step.
//
// Why: a decode step is dozens of short parallel sections (each product, each attention), and an
// OpenMP parallel region per section costs the step a team start, an end barrier and two futex
// wakes each (~0.8 us of bookkeeping on Zen 4, measured against a spin hand-off's 0.1 us), and
// the second thread then waits for the first's serial work between sections without knowing when
// the next one comes. llamaworks::decode_step runs its whole step in one region instead: thread 0
// runs the step as before, and each section it meets is handed to the team through two atomics
// (llama.cpp's compute graph works the same way: one thread pool per graph, spin barriers).
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
// once every thread has left the region. Without threads to spare, or already inside a region,
// body() just runs.
void with_team(c10::function_ref<void()> body);

}  // namespace lw
