// lw::parallel_for and lw::with_team (parallel.h).
#include "parallel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sched.h>
#endif

namespace lw {
namespace {

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins of a waiting thread before it also yields its CPU on each round: about 0.1-0.4 ms of
// pauses, longer than any serial part of a decode step (tens of us), short enough that more
// threads than CPUs (a busy machine) cost a time slice rather than a stall.
constexpr int64_t SPINS = 1 << 13;

template <typename Ready>
void wait_until(Ready ready) {
  for (int64_t i = 0; !ready(); ++i) {
    pause();
    if (i >= SPINS) std::this_thread::yield();
  }
}

struct Team {
  int64_t size = 1;                 // threads, thread 0 included
  std::atomic<int64_t> epoch{0};    // sections handed out so far; -1: the step is over
  std::atomic<int64_t> pending{0};  // threads 1.. that have not finished the current section
  // The current section, written by thread 0 before it moves epoch on.
  const RangeFn* fn = nullptr;
  int64_t begin = 0, end = 0, chunk = 0;
  // The weights the next section reads (prefetch_next), for the threads to fetch while they wait.
  std::atomic<int64_t> hints{0};
  std::atomic<const char*> hint{nullptr};
  std::atomic<int64_t> hint_bytes{0};
  std::once_flag failed;
  std::exception_ptr error;
};

thread_local Team* active = nullptr;  // set on thread 0 inside with_team
std::atomic<int64_t> sections{0};     // handed to a team since the library loaded (lw_team_sections)

// The CPUs this process may run on (its affinity mask), read once.
int64_t cpus() {
  static const int64_t n = [] {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<int64_t>(CPU_COUNT(&set));
#endif
    return static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

// LLAMAWORKS_DECODE_TEAM=0: no team (each section its own at::parallel_for region, as before).
bool teams_on() {
  static const bool on = [] {
    const char* v = std::getenv("LLAMAWORKS_DECODE_TEAM");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

void run_part(Team& team, const RangeFn& fn, int64_t tid) {
  const int64_t b = team.begin + tid * team.chunk;
  if (b >= team.end) return;
  try {
    fn(b, std::min(team.end, b + team.chunk));
  } catch (...) {
    std::call_once(team.failed, [&] { team.error = std::current_exception(); });
  }
}

// This thread's share of the hinted bytes (the part of the next section it will most likely read,
// at::parallel_for's order: thread t takes the t-th of `size` equal parts), read into its caches
// up to PREFETCH_BYTES (within the smallest L2 we run on, Zen 3's 512 KiB), stopping as soon as a
// section is handed out. One load per 64-byte line; the hardware prefetchers follow the stream.
// Measured on Zen 4 (small, fp32, AVX2 kernels, the step alone): 128 KiB to 4 MiB all within 1%.
constexpr int64_t PREFETCH_BYTES = 256 << 10;
void prefetch(Team& team, int64_t tid, int64_t seen) {
  const int64_t share = team.hint_bytes.load(std::memory_order_relaxed) / team.size;
  const char* p = team.hint.load(std::memory_order_relaxed) + tid * share;
  const int64_t n = std::min(share, PREFETCH_BYTES);
  int64_t sink = 0;
  for (int64_t i = 0; i < n; i += 64) {
    sink += *reinterpret_cast<const volatile char*>(p + i);
    if ((i & 4095) == 0 && team.epoch.load(std::memory_order_relaxed) != seen) break;
  }
  asm volatile("" : : "r"(sink));
}

void worker(Team& team, int64_t tid) {
  int64_t seen = 0, hinted = 0;
  for (;;) {
    int64_t e;
    wait_until([&] {
      e = team.epoch.load(std::memory_order_acquire);
      if (e != seen) return true;
      const int64_t h = team.hints.load(std::memory_order_acquire);
      if (h != hinted) {
        hinted = h;
        prefetch(team, tid, seen);
        return (e = team.epoch.load(std::memory_order_acquire)) != seen;
      }
      return false;
    });
    if (e < 0) return;
    seen = e;
    run_part(team, *team.fn, tid);
    team.pending.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace

void parallel_for(int64_t begin, int64_t end, int64_t grain, RangeFn f) {
  Team* team = active;
  if (team == nullptr) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  // at::parallel_for's split (ATen/Parallel-inl.h, ParallelOpenMP.h): serial up to the grain,
  // else min(threads, ceil(n / grain)) chunks of ceil(n / threads).
  const int64_t n = end - begin;
  if (n <= 0) return;
  if (n <= grain || n == 1) {
    f(begin, end);
    return;
  }
  const int64_t threads = grain > 0 ? std::min(team->size, divup(n, grain)) : team->size;
  team->fn = &f;
  team->begin = begin;
  team->end = end;
  team->chunk = divup(n, threads);
  team->pending.store(team->size - 1, std::memory_order_relaxed);
  sections.fetch_add(1, std::memory_order_relaxed);
  team->epoch.fetch_add(1, std::memory_order_acq_rel);  // hands the section out
  active = nullptr;  // a section inside this one runs where it is (the team is busy with this one)
  run_part(*team, f, 0);
  active = team;
  wait_until([&] { return team->pending.load(std::memory_order_acquire) == 0; });
  if (team->error) {
    std::exception_ptr e = team->error;
    team->error = nullptr;
    std::rethrow_exception(e);
  }
}

void prefetch_next(const void* p, int64_t bytes) {
  Team* team = active;
  if (team == nullptr || team->size < 2) return;
  team->hint.store(static_cast<const char*>(p), std::memory_order_relaxed);
  team->hint_bytes.store(bytes, std::memory_order_relaxed);
  team->hints.fetch_add(1, std::memory_order_acq_rel);
}

void with_team(c10::function_ref<void()> body) {
  const int64_t threads = at::get_num_threads();
  // More threads than CPUs: no team. Its threads never sleep, so a section would wait for each of them
  // to be scheduled in turn (small's step: 14.6 ms at 4 threads on 2 CPUs, against 2.9 ms with a
  // region per section, whose threads sleep on a futex when throttled).
  if (threads <= 1 || threads > cpus() || active != nullptr || at::in_parallel_region() || !teams_on()) {
    body();
    return;
  }
#ifdef _OPENMP
  Team team;
  std::exception_ptr error;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // The threads OpenMP gave this region (fewer than asked for under nesting or limits).
    const int64_t tid = omp_get_thread_num(), size = std::min<int64_t>(omp_get_num_threads(), threads);
    if (tid >= size) return;
    if (tid != 0) {
      worker(team, tid);
      return;
    }
    team.size = size;  // the workers read it only after a section or a hint is handed out (acquire)
    active = &team;
    try {
      body();
    } catch (...) {
      error = std::current_exception();
    }
    active = nullptr;
    team.epoch.store(-1, std::memory_order_release);  // the workers leave
  });
  if (error) std::rethrow_exception(error);
#else
  body();
#endif
}

}  // namespace lw

// The sections handed to a team so far (tests check that a step's products ran on one).
extern "C" int64_t lw_team_sections() { return lw::sections.load(); }
