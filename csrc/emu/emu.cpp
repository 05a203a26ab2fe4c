// The CPU emulator's runtime (see cuda_emu.h): blocks of fibers, barriers, warp
// collectives, deferred cp.async, proxy fences, device profiles, launch checks.

#include "emu/cuda_emu.h"
#include "emu/tma_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif
#if defined(DITKERNELS_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#endif

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace ditkernels {
namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

// ThreadSanitizer as racecheck (CMake DITKERNELS_EMU_SANITIZE=thread): the kernels
// are instrumented, this file is not, and each fiber is a TSan fiber whose switches
// carry no happens-before edge. The edges are exactly CUDA's: block barriers, warp
// collectives, a block's start (after the shared-memory fill) and its end. Any
// shared- or global-memory access pair not ordered by them is reported as a race.
namespace tsan {
#if defined(DITKERNELS_EMU_TSAN)
void* current() { return __tsan_get_current_fiber(); }
void* create() { return __tsan_create_fiber(0); }
void destroy(void* fiber) { __tsan_destroy_fiber(fiber); }
void switch_to(void* fiber) { __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync); }
void release(const void* sync) { __tsan_release(const_cast<void*>(sync)); }
void acquire(const void* sync) { __tsan_acquire(const_cast<void*>(sync)); }
void reads(const void* p, size_t n) { __tsan_read_range(const_cast<void*>(p), n); }
void writes(void* p, size_t n) { __tsan_write_range(p, n); }
#else
void* current() { return nullptr; }
void* create() { return nullptr; }
void destroy(void*) {}
void switch_to(void*) {}
void release(const void*) {}
void acquire(const void*) {}
void reads(const void*, size_t) {}
void writes(void*, size_t) {}
#endif
}  // namespace tsan

// A fiber's saved execution context. On x86-64 a switch saves the callee-saved
// registers on the old stack and swaps stack pointers (no signal-mask system call,
// which makes ucontext's swapcontext ten times slower); elsewhere, ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
extern "C" void dk_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .p2align 4
  .globl dk_emu_switch
  .hidden dk_emu_switch
  .type dk_emu_switch, @function
dk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dk_emu_switch, .-dk_emu_switch
)");
void switch_context(Context& from, Context& to) { dk_emu_switch(&from.sp, to.sp); }
// The first switch to the fiber "returns" into entry with the stack aligned as at
// a call; entry must never return.
void make_context(Context& ctx, char* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<std::uintptr_t>(stack + bytes) & ~std::uintptr_t{15};
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                               // entry's return address: none
  *--sp = reinterpret_cast<void*>(entry);        // popped by dk_emu_switch's ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;   // rbp, rbx, r12-r15
  ctx.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void make_context(Context& ctx, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack;
  ctx.uc.uc_stack.ss_size = bytes;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}
#endif
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

// DITKERNELS_EMU_DEVICE's profiles. The opt-in limit is
// cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KiB on Hopper, 163 KiB on the A100
// (1 KiB of its 164 KiB per SM is reserved), 99 KiB on sm_89 (L40S, RTX 4090).
constexpr DeviceProperties kDeviceProfiles[] = {
    {"h100", 9, 0, 132, 227 * 1024, 228 * 1024, 1024},
    {"h200", 9, 0, 132, 227 * 1024, 228 * 1024, 1024},
    {"a100", 8, 0, 108, 163 * 1024, 164 * 1024, 1024},
    {"sm89", 8, 9, 142, 99 * 1024, 100 * 1024, 1024},
};

struct PendingCopy {
  void* dst;
  unsigned char data[16];
  int countdown = 0;  // DITKERNELS_EMU_CPASYNC=early: the issuer's yields before it lands
  bool landed = false;
};

struct Fiber {
  Context ctx;
  void* tsan_fiber = nullptr;
  dim3 tid;
  int index = 0, lane = 0, warp = 0;
  uint64_t rng = 0;                   // early cp.async landing points
  uint64_t proxy_fenced_at = 0;       // ProxyView::clock at its latest fence.proxy.async
  bool done = false;
  const unsigned* wait_on = nullptr;  // runnable again once *wait_on != wait_value
  unsigned wait_value = 0;
  bool in_mbarrier_wait = false;      // the wait is an mbarrier's
  std::vector<PendingCopy> open_group;
  std::deque<std::vector<PendingCopy>> groups;
};

struct Warp {
  int lanes = 0, alive = 0, arrived = 0;
  unsigned gen = 0;
  const char* what = nullptr;
  alignas(16) unsigned char slots[32 * kSlotBytes];
};

// One wgmma.mma_async m64nNk16/k32 as issued: its operands as read at issue, the shared
// memory they came from (to check at retirement that nobody overwrote it), and each
// thread's accumulators with their value at issue (unless an earlier wgmma still in
// flight writes them: then it chains on that one's result).
struct WgmmaOp {
  WgmmaType type;
  int scale_d = 0;
  int n = 0;                      // N; each thread holds n / 2 accumulators
  int k = 0;                      // 16 (fp16/bf16) or 32 (int8)
  std::vector<double> a, b;       // [64][k], [n][k]
  std::vector<uint32_t> chunks;   // shared offsets of the 16-byte chunks read
  std::vector<unsigned char> bytes;
  void* acc[128] = {};
  bool has_d_in[128] = {};
  std::vector<uint32_t> d_in;     // [128][n / 2] raw accumulator words
};

struct Warpgroup {
  int arrived = 0;
  unsigned gen = 0;
  const char* what = nullptr;
  uint64_t desc_a = 0, desc_b = 0;
  int scale_d = 0, n = 0;
  WgmmaType type = WgmmaType::kBF16;
  void* acc[128] = {};
  bool a_in_registers = false;  // A from registers, B MN-major (mma_rs_mn)
  uint32_t a_frag[128][4] = {};
  std::vector<WgmmaOp> open;
  std::deque<std::vector<WgmmaOp>> groups;
  // The latest retired result per accumulator array: the input of the wgmma chained
  // after it (issued while it was in flight, so its registers were poison then).
  std::unordered_map<const void*, std::vector<uint32_t>> results;
  // wgmma.fence bookkeeping: fences executed, and per accumulator array what the
  // latest wgmma left in it (poison at issue, the result at retirement) and `fences`
  // then. Contents changed with no fence since are a register write the fence should
  // have ordered before the next wgmma.
  unsigned fences = 0;
  struct AccTrack {
    std::vector<uint32_t> left;
    unsigned fences = 0;
  };
  std::unordered_map<const void*, AccTrack> acc_track;
};

// fence.proxy.async bookkeeping: what the async proxy (wgmma's operand reads) may
// see of each 16-byte chunk of dynamic shared memory. A cp.async landing is the
// issuing thread's write, visible once that thread fences; plain stores cannot be
// attributed to a thread, so a chunk whose bytes changed since the async proxy last
// read it needs some thread's fence since that read.
struct ProxyView {
  uint64_t clock = 0;                // advances at every landing and fence
  uint64_t last_fence = 0;           // clock at the block's latest fence.proxy.async
  std::vector<int> writer;           // thread whose cp.async landed in the chunk last, or -1
  std::vector<uint64_t> landed_at;   // clock at that landing
  std::vector<uint64_t> seen_at;     // clock when the async proxy last read the chunk
  std::vector<unsigned char> seen;   // the bytes it read then (at first: the 0xff fill)
};

// An mbarrier, kept beside its 8 bytes of shared memory (keyed by their offset).
struct MBarrier {
  uint32_t expected = 0, pending = 0;
  int64_t tx = 0;          // transaction bytes still expected (may dip below 0)
  uint32_t phase = 0;      // phases completed so far; the current one's parity is phase & 1
  unsigned version = 0;    // bumped at every change, so that waiters re-check
};

// One cp.async.bulk.tensor in flight: its 16-byte chunks as read at issue, where
// they land (swizzled), and the barrier that counts them.
struct PendingTma {
  uint32_t bar = 0;
  int issuer = 0;
  int countdown = 0;  // DITKERNELS_EMU_CPASYNC=early, as for cp.async
  std::vector<uint32_t> offsets;
  std::vector<unsigned char> bytes;
};

struct LaunchState {
  const char* name;
  dim3 grid, block;
  size_t smem_bytes;
  const DeviceProperties* device = nullptr;
  bool early_cp_async = false;  // DITKERNELS_EMU_CPASYNC=early
  uint64_t seed = 0;            // of the landing points: DITKERNELS_EMU_SEED and the launch
  std::mutex error_mutex;
  std::string error;
};

// What one host thread is running.
struct Worker {
  LaunchState* launch = nullptr;
  dim3 block_idx;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<Warp> warps;
  std::vector<Warpgroup> warpgroups;
  ProxyView proxy;
  std::unordered_map<uint32_t, MBarrier> barriers;
  std::deque<PendingTma> tma;
  int alive = 0, arrived = 0;
  unsigned gen = 0;
  Fiber* current = nullptr;
  Context scheduler;
  void* tsan_scheduler = nullptr;
  char block_start = 0, block_end = 0;  // TSan sync addresses
  const std::function<void()>* body = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::unique_ptr<unsigned char, decltype(&std::free)> smem_buffer{nullptr, &std::free};
  size_t smem_capacity = 0;
};

thread_local Worker worker;

std::mutex attribute_mutex;
std::unordered_map<const void*, int> max_dynamic_smem;

Worker& w() { return worker; }
Fiber& me() { return *w().current; }

std::string where() {
  const Worker& k = w();
  char buf[160];
  if (k.current == nullptr) return "host";
  std::snprintf(buf, sizeof(buf), "block (%u, %u, %u) thread (%u, %u, %u)", k.block_idx.x,
                k.block_idx.y, k.block_idx.z, k.current->tid.x, k.current->tid.y,
                k.current->tid.z);
  return buf;
}

void report(const std::string& msg) {
  LaunchState* l = w().launch;
  if (l == nullptr) return;
  std::lock_guard<std::mutex> lock(l->error_mutex);
  if (l->error.empty()) l->error = msg + " (" + where() + ")";
}

void land(Fiber& f, PendingCopy& c) {
  Worker& k = w();
  tsan::writes(c.dst, 16);
  std::memcpy(c.dst, c.data, 16);
  c.landed = true;
  const size_t chunk = static_cast<size_t>(static_cast<unsigned char*>(c.dst) - k.smem) / 16;
  k.proxy.writer[chunk] = f.index;
  k.proxy.landed_at[chunk] = ++k.proxy.clock;
}

void apply(Fiber& f, std::vector<PendingCopy>& group) {
  for (PendingCopy& c : group) {
    if (!c.landed) land(f, c);
  }
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Early landing: before the issuer yields (the only points where other threads run
// and can observe it), each of its copies lands once its countdown runs out.
void land_due(Fiber& f) {
  auto tick = [&f](std::vector<PendingCopy>& group) {
    for (PendingCopy& c : group) {
      if (!c.landed && c.countdown-- <= 0) land(f, c);
    }
  };
  for (auto& group : f.groups) tick(group);
  tick(f.open_group);
}

void land_tma_due(Fiber& f);

void to_scheduler(Fiber& f) {
  if (w().launch->early_cp_async && !f.done) {
    land_due(f);
    land_tma_due(f);
  }
  tsan::switch_to(w().tsan_scheduler);
  switch_context(f.ctx, w().scheduler);
}

void wait_until_changed(const unsigned* gen) {
  Fiber& f = me();
  f.wait_on = gen;
  f.wait_value = *gen;
  to_scheduler(f);
}

// Arrives at the warp barrier of the calling lane; the last lane to arrive releases it.
void warp_barrier(const char* what) {
  Warp& wp = w().warps[me().warp];
  if (wp.arrived == 0) {
    wp.what = what;
  } else if (wp.what != what && std::strcmp(wp.what, what) != 0) {
    report(std::string("divergent warp collectives: ") + what + " while other lanes are in " +
               wp.what);
  }
  tsan::release(&wp);
  if (++wp.arrived == wp.alive) {
    wp.arrived = 0;
    ++wp.gen;
  } else {
    wait_until_changed(&wp.gen);
  }
  tsan::acquire(&wp);
}

void on_exit(Fiber& f) {
  Worker& k = w();
  for (auto& group : f.groups) apply(f, group);
  apply(f, f.open_group);
  f.groups.clear();
  f.open_group.clear();
  if (f.warp / 4 < static_cast<int>(k.warpgroups.size())) {
    const Warpgroup& g = k.warpgroups[f.warp / 4];
    if (!g.open.empty() || !g.groups.empty()) {
      report("a thread exited with wgmma in flight (no wgmma.wait_group 0 after the last)");
    }
  }
  Warp& wp = k.warps[f.warp];
  --wp.alive;
  if (wp.arrived > 0) {
    report(std::string("a lane exited while the rest of its warp waits in ") + wp.what);
    if (wp.arrived == wp.alive) {
      wp.arrived = 0;
      ++wp.gen;
    }
  }
  --k.alive;
  if (k.arrived > 0 && k.arrived == k.alive) {
    k.arrived = 0;
    ++k.gen;
  }
  f.done = true;
}

[[noreturn]] void fiber_entry() {
  Worker& k = w();
  tsan::acquire(&k.block_start);
  (*k.body)();
  on_exit(*k.current);
  tsan::release(&k.block_end);
  to_scheduler(*k.current);
  std::abort();  // a finished fiber is never resumed
}

void run_block(Worker& k, const dim3& block_idx, int64_t linear_idx) {
  const bool reverse = linear_idx % 2 == 1;
  const dim3 block = k.launch->block;
  const int n = static_cast<int>(block.x * block.y * block.z);
  k.block_idx = block_idx;
  k.fibers.assign(n, Fiber{});
  while (static_cast<int>(k.stacks.size()) < n) k.stacks.emplace_back(new char[kStackBytes]);
  const int nwarps = (n + 31) / 32;
  k.warps.assign(nwarps, Warp{});
  for (int i = 0; i < nwarps; ++i) k.warps[i].lanes = k.warps[i].alive = std::min(32, n - 32 * i);
  k.warpgroups.clear();
  k.warpgroups.resize(n / 128);
  k.alive = n;
  k.arrived = 0;
  k.gen = 0;
  k.barriers.clear();
  k.tma.clear();
  if (k.smem_bytes > 0) std::memset(k.smem, 0xff, k.smem_bytes);
  const size_t chunks = k.smem_bytes / 16;
  k.proxy.clock = k.proxy.last_fence = 0;
  k.proxy.writer.assign(chunks, -1);
  k.proxy.landed_at.assign(chunks, 0);
  k.proxy.seen_at.assign(chunks, 0);
  k.proxy.seen.assign(k.smem_bytes, 0xff);
  for (int i = 0; i < n; ++i) {
#if defined(__SANITIZE_ADDRESS__)
    // Frames a fiber never returned from (a deadlocked launch, fiber_entry itself)
    // leave their redzones poisoned in the reused stack.
    ASAN_UNPOISON_MEMORY_REGION(k.stacks[i].get(), kStackBytes);
#endif
    Fiber& f = k.fibers[i];
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.index = i;
    f.lane = i % 32;
    f.warp = i / 32;
    f.rng = k.launch->seed ^ (static_cast<uint64_t>(linear_idx) * 0xd1b54a32d192ed03ull) ^
            (static_cast<uint64_t>(i) * 0x8cb92ba72f3d8dd7ull);
    make_context(f.ctx, k.stacks[i].get(), kStackBytes, fiber_entry);
    f.tsan_fiber = tsan::create();
  }
  tsan::release(&k.block_start);
  while (k.alive > 0) {
    bool progressed = false;
    for (int j = 0; j < n; ++j) {
      Fiber& f = k.fibers[reverse ? n - 1 - j : j];
      if (f.done || (f.wait_on != nullptr && *f.wait_on == f.wait_value)) continue;
      f.wait_on = nullptr;
      k.current = &f;
      tsan::switch_to(f.tsan_fiber);
      switch_context(k.scheduler, f.ctx);
      k.current = nullptr;
      progressed = true;
    }
    if (!progressed) {
      int at_block = 0, at_mbarrier = 0;
      for (const Fiber& f : k.fibers) {
        at_block += !f.done && f.wait_on == &k.gen;
        at_mbarrier += !f.done && f.in_mbarrier_wait;
      }
      report("deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads, " +
             std::to_string(at_mbarrier) + " on mbarrier phases and " +
             std::to_string(k.alive - at_block - at_mbarrier) +
             " at warp collectives that can never complete");
      // The abandoned fibers never reach their end: release on their behalf, so that
      // the host reusing what they read is no race to ThreadSanitizer.
      for (Fiber& f : k.fibers) {
        if (f.done) continue;
        tsan::switch_to(f.tsan_fiber);
        tsan::release(&k.block_end);
      }
      tsan::switch_to(k.tsan_scheduler);
      break;
    }
  }
  if (!k.tma.empty()) {
    report("the block ended with " + std::to_string(k.tma.size()) +
           " TMA loads in flight (no wait on their mbarrier)");
  }
  tsan::acquire(&k.block_end);
  for (Fiber& f : k.fibers) tsan::destroy(f.tsan_fiber);
}

void run_blocks(LaunchState& l, const std::function<void()>& body, int64_t first, int64_t step) {
  Worker& k = w();
  k.launch = &l;
  k.body = &body;
  k.tsan_scheduler = tsan::current();
  k.smem_bytes = l.smem_bytes;
  if (k.smem_capacity < l.smem_bytes) {
    const size_t bytes = (l.smem_bytes + 127) / 128 * 128;
    k.smem_buffer.reset(static_cast<unsigned char*>(std::aligned_alloc(128, bytes)));
    k.smem_capacity = bytes;
  }
  k.smem = k.smem_buffer.get();
  const int64_t total = int64_t{l.grid.x} * l.grid.y * l.grid.z;
  for (int64_t i = first; i < total; i += step) {
    const dim3 b(static_cast<unsigned>(i % l.grid.x), static_cast<unsigned>((i / l.grid.x) % l.grid.y),
                 static_cast<unsigned>(i / (int64_t{l.grid.x} * l.grid.y)));
    run_block(k, b, i);
    {
      std::lock_guard<std::mutex> lock(l.error_mutex);
      if (!l.error.empty()) break;
    }
  }
  k.launch = nullptr;
  k.body = nullptr;
}

}  // namespace

const dim3& thread_idx() { return me().tid; }
const dim3& block_idx() { return w().block_idx; }
const dim3& block_dim() { return w().launch->block; }
const dim3& grid_dim() { return w().launch->grid; }
int lane_id() { return me().lane; }
unsigned char* dynamic_smem() { return w().smem; }

void syncthreads() {
  Worker& k = w();
  tsan::release(&k.gen);
  if (++k.arrived == k.alive) {
    k.arrived = 0;
    ++k.gen;
  } else {
    wait_until_changed(&k.gen);
  }
  tsan::acquire(&k.gen);
}

const unsigned char* warp_gather(const void* in, size_t bytes, unsigned mask, const char* what) {
  Warp& wp = w().warps[me().warp];
  const unsigned expected = wp.lanes == 32 ? 0xffffffffu : (1u << wp.lanes) - 1u;
  if ((mask & expected) != expected) report(std::string(what) + ": partial lane masks are not emulated");
  if (wp.alive != wp.lanes) report(std::string(what) + " with exited lanes in the warp");
  std::memcpy(wp.slots + me().lane * kSlotBytes, in, bytes);
  warp_barrier(what);
  return wp.slots;
}

void warp_release() { warp_barrier("(end of warp collective)"); }

bool check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const Worker& k = w();
  const auto* c = static_cast<const unsigned char*>(p);
  char buf[200];
  if (c < k.smem || c + bytes > k.smem + k.smem_bytes) {
    std::snprintf(buf, sizeof(buf), "%s: shared address %+lld is outside the %zu bytes of dynamic "
                  "shared memory", what, static_cast<long long>(c - k.smem), k.smem_bytes);
    report(buf);
    return false;
  }
  if (reinterpret_cast<std::uintptr_t>(p) % align != 0) {
    std::snprintf(buf, sizeof(buf), "%s: shared offset %lld is not %zu-byte aligned", what,
                  static_cast<long long>(c - k.smem), align);
    report(buf);
    return false;
  }
  return true;
}

void cp_async(void* smem, const void* gmem, int src_bytes) {
  if (!check_smem(smem, 16, 16, "cp.async")) return;
  if (src_bytes < 0 || src_bytes > 16) {
    report("cp.async: src size " + std::to_string(src_bytes) + " outside [0, 16]");
    return;
  }
  if (src_bytes > 0 && reinterpret_cast<std::uintptr_t>(gmem) % 16 != 0) {
    report("cp.async.cg 16: global source address is not 16-byte aligned");
    return;
  }
  Fiber& f = me();
  PendingCopy c;
  c.dst = smem;
  std::memset(c.data, 0, 16);
  // Lands at the issuer's first yield with probability 1/2, its second with 1/4, ...
  if (w().launch->early_cp_async) c.countdown = __builtin_ctzll(splitmix64(f.rng) | (1ull << 7));
  if (src_bytes > 0) {
    tsan::reads(gmem, src_bytes);
    std::memcpy(c.data, gmem, src_bytes);
  }
  f.open_group.push_back(c);
}

void cp_async_commit() {
  Fiber& f = me();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait(int pending_groups) {
  Fiber& f = me();
  while (static_cast<int>(f.groups.size()) > pending_groups) {
    apply(f, f.groups.front());
    f.groups.pop_front();
  }
}

void fence_proxy_async() {
  ProxyView& v = w().proxy;
  me().proxy_fenced_at = v.last_fence = ++v.clock;
}

uint32_t shared_window_address(const void* p) {
  return kSharedWindowBase +
         static_cast<uint32_t>(static_cast<const unsigned char*>(p) - w().smem);
}

namespace {

// Arrives at the calling thread's warpgroup barrier; the last of the 128 runs
// `last` before releasing the others.
template <typename Last>
void warpgroup_collective(const char* what, Last&& last) {
  Worker& k = w();
  const int g = me().warp / 4;
  if (g >= static_cast<int>(k.warpgroups.size())) {
    report(std::string(what) + ": the thread's warpgroup is incomplete (block of " +
           std::to_string(k.fibers.size()) + " threads)");
    return;
  }
  int alive = 0;
  for (int i = 0; i < 4; ++i) alive += k.warps[4 * g + i].alive;
  if (alive != 128) report(std::string(what) + " with exited threads in the warpgroup");
  Warpgroup& wg = k.warpgroups[g];
  if (wg.arrived == 0) {
    wg.what = what;
  } else if (wg.what != what && std::strcmp(wg.what, what) != 0) {
    report(std::string("divergent warpgroup collectives: ") + what +
           " while other threads are in " + wg.what);
  }
  tsan::release(&wg);
  if (++wg.arrived == 128) {
    last(wg);
    tsan::release(&wg);  // what `last` wrote (other threads' accumulators) happens before
    wg.arrived = 0;
    ++wg.gen;
  } else {
    wait_until_changed(&wg.gen);
  }
  tsan::acquire(&wg);
}

int thread_in_warpgroup() { return (me().warp % 4) * 32 + me().lane; }

// Whether the async proxy may read the 16-byte chunk at shared offset `off`: its
// latest generic-proxy writes were fenced (ProxyView). Records what it read.
bool async_proxy_may_read(uint32_t off) {
  Worker& k = w();
  ProxyView& v = k.proxy;
  const size_t c = off / 16;
  const unsigned char* bytes = k.smem + off;
  const int writer = v.writer[c];
  if (writer >= 0 && v.landed_at[c] > v.seen_at[c]) {
    if (k.fibers[writer].proxy_fenced_at < v.landed_at[c]) {
      report("wgmma reads shared offset " + std::to_string(off) + ", written by the cp.async of "
             "thread " + std::to_string(writer) + " with no fence.proxy.async by that thread since");
      return false;
    }
  } else if (std::memcmp(bytes, &v.seen[off], 16) != 0 && v.last_fence <= v.seen_at[c]) {
    report("wgmma reads shared offset " + std::to_string(off) + ", changed by generic-proxy "
           "stores with no fence.proxy.async since the async proxy last read it");
    return false;
  }
  std::memcpy(&v.seen[off], bytes, 16);
  v.seen_at[c] = v.clock;
  return true;
}

// Whether each thread's accumulators are as the warpgroup's latest wgmma on them left
// them, or a wgmma.fence came since (PTX ISA: wgmma.fence orders register accesses
// before a wgmma.mma_async that uses the same registers, and is needed before the
// first).
bool accumulators_fenced(const Warpgroup& wg, int words) {
  for (int t = 0; t < 128; ++t) {
    const auto it = wg.acc_track.find(wg.acc[t]);
    if (it == wg.acc_track.end()) {
      if (wg.fences > 0) continue;
      report("wgmma.mma_async before any wgmma.fence of its warpgroup");
      return false;
    }
    const Warpgroup::AccTrack& track = it->second;
    if (track.fences == wg.fences &&
        (static_cast<int>(track.left.size()) != words ||
         std::memcmp(track.left.data(), wg.acc[t], words * 4) != 0)) {
      report("wgmma.mma_async: thread " + std::to_string(t) + " of the warpgroup wrote its "
             "accumulators since the last wgmma on them, with no wgmma.fence in between");
      return false;
    }
  }
  return true;
}

// The descriptor's fields, if it is one the emulator models: the 128-byte swizzle,
// base offset 0.
struct Descriptor {
  uint32_t start, lbo, sbo;
};
bool decode(uint64_t desc, Descriptor& d) {
  d.start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  d.lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  d.sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const int base_offset = static_cast<int>((desc >> 49) & 7);
  const int mode = static_cast<int>(desc >> 62);
  if (mode != 1 || base_offset != 0) {
    report("emulated wgmma: only operands with the 128-byte swizzle and base offset 0 "
           "are emulated (descriptor mode " + std::to_string(mode) + ", base offset " +
           std::to_string(base_offset) + ")");
    return false;
  }
  return true;
}

// Reads the 16-byte chunk at shared-window address `addr` (before the swizzle, which
// XORs address bits 4-6 with bits 7-9) into vals (8 fp16/bf16 or 16 int8 values).
bool read_chunk(uint32_t addr, WgmmaOp& op, double* vals) {
  const Worker& k = w();
  const uint32_t phys = addr ^ (((addr >> 7) & 7) << 4);
  const int64_t off = int64_t{phys} - kSharedWindowBase;
  if (off < 0 || off + 16 > static_cast<int64_t>(k.smem_bytes)) {
    report("emulated wgmma: an operand reads shared offset " + std::to_string(off) +
           ", outside the " + std::to_string(k.smem_bytes) + " bytes of dynamic shared memory");
    return false;
  }
  if (!async_proxy_may_read(static_cast<uint32_t>(off))) return false;
  const unsigned char* src = k.smem + off;
  tsan::reads(src, 16);
  op.chunks.push_back(static_cast<uint32_t>(off));
  op.bytes.insert(op.bytes.end(), src, src + 16);
  const int per_chunk = op.type == WgmmaType::kS8 ? 16 : 8;
  for (int e = 0; e < per_chunk; ++e) {
    if (op.type == WgmmaType::kS8) {
      vals[e] = static_cast<int8_t>(src[e]);
    } else {
      uint16_t bits;
      std::memcpy(&bits, src + 2 * e, 2);
      vals[e] = op.type == WgmmaType::kBF16
                    ? static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()))
                    : static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
    }
  }
  return true;
}

// Reads `rows` K-major rows of 32 bytes through a 128B-swizzle descriptor: row r at
// start + (r % 8) 128 + (r / 8) SBO.
bool read_operand(uint64_t desc, int rows, WgmmaOp& op, std::vector<double>& out) {
  Descriptor d;
  if (!decode(desc, d)) return false;
  const int per_chunk = op.type == WgmmaType::kS8 ? 16 : 8;
  out.assign(static_cast<size_t>(rows) * op.k, 0.0);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < 2; ++c) {
      const uint32_t addr = d.start + (r % 8) * 128 + (r / 8) * d.sbo + c * 16;
      if (!read_chunk(addr, op, &out[static_cast<size_t>(r) * op.k + c * per_chunk])) return false;
    }
  }
  return true;
}

// Reads an MN-major (transposed) B of `cols` columns and k = 16 through a 128B-swizzle
// descriptor (fp16/bf16): k row kk of column block n / 64 at
// start + (n / 64) LBO + (kk % 8) 128 + (kk / 8) SBO, the block's 64 columns in its
// eight chunks; CUTLASS's Swizzle<3,4,3> o ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)).
bool read_operand_mn(uint64_t desc, int cols, WgmmaOp& op, std::vector<double>& out) {
  Descriptor d;
  if (!decode(desc, d)) return false;
  out.assign(static_cast<size_t>(cols) * op.k, 0.0);
  double vals[8];
  for (int kk = 0; kk < op.k; ++kk) {
    for (int nc = 0; nc < cols / 8; ++nc) {
      const uint32_t addr = d.start + (nc / 8) * d.lbo + (nc % 8) * 16 + (kk % 8) * 128 +
                            (kk / 8) * d.sbo;
      if (!read_chunk(addr, op, vals)) return false;
      for (int e = 0; e < 8; ++e) out[static_cast<size_t>(nc * 8 + e) * op.k + kk] = vals[e];
    }
  }
  return true;
}

// A (64 x 16) from the warpgroup's registers: warp w's lane l holds, as in an mma.sync
// m16n8k16 A fragment, rows 16 w + l / 4 (+ 8 in registers 1 and 3) and columns
// 2 (l % 4) + {0, 1} (+ 8 in registers 2 and 3).
void read_register_a(const Warpgroup& wg, WgmmaOp& op) {
  op.a.assign(64 * 16, 0.0);
  for (int t = 0; t < 128; ++t) {
    const int warp = t / 32, lane = t % 32;
    for (int r = 0; r < 4; ++r) {
      for (int e = 0; e < 2; ++e) {
        const uint16_t bits = static_cast<uint16_t>(wg.a_frag[t][r] >> (16 * e));
        const double v = op.type == WgmmaType::kBF16
                             ? static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()))
                             : static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
        const int row = 16 * warp + lane / 4 + (r % 2) * 8;
        const int col = 2 * (lane % 4) + e + (r / 2) * 8;
        op.a[static_cast<size_t>(row) * 16 + col] = v;
      }
    }
  }
}

bool in_flight(const Warpgroup& wg, const void* acc, int t) {
  for (const WgmmaOp& op : wg.open)
    if (op.acc[t] == acc) return true;
  for (const auto& group : wg.groups)
    for (const WgmmaOp& op : group)
      if (op.acc[t] == acc) return true;
  return false;
}

void issue(Warpgroup& wg) {
  WgmmaOp op;
  op.type = wg.type;
  op.scale_d = wg.scale_d;
  op.k = wg.type == WgmmaType::kS8 ? 32 : 16;
  op.n = wg.n;
  const int words = op.n / 2;
  if (w().launch->device->major != 9) {
    report(std::string("wgmma.mma_async on an emulated ") + w().launch->device->name +
           " (compute capability " + std::to_string(w().launch->device->major) + "." +
           std::to_string(w().launch->device->minor) + "): wgmma needs sm_90a");
    return;
  }
  if (!accumulators_fenced(wg, words)) return;
  if (wg.a_in_registers) {
    read_register_a(wg, op);
    if (!read_operand_mn(wg.desc_b, op.n, op, op.b)) return;
  } else if (!read_operand(wg.desc_a, 64, op, op.a) || !read_operand(wg.desc_b, op.n, op, op.b)) {
    return;
  }
  op.d_in.assign(128 * words, 0);
  for (int t = 0; t < 128; ++t) {
    op.acc[t] = wg.acc[t];
    op.has_d_in[t] = !in_flight(wg, wg.acc[t], t);
    if (op.has_d_in[t]) std::memcpy(&op.d_in[t * words], wg.acc[t], words * 4);
  }
  // Poison: what a thread reads from its accumulators before the wait is garbage.
  const uint32_t poison = op.type == WgmmaType::kS8 ? 0x5a5a5a5au : 0xffffffffu;
  for (int t = 0; t < 128; ++t) {
    auto* words = static_cast<uint32_t*>(wg.acc[t]);
    for (int i = 0; i < op.n / 2; ++i) words[i] = poison;
    Warpgroup::AccTrack& track = wg.acc_track[wg.acc[t]];
    track.left.assign(words, words + op.n / 2);
    track.fences = wg.fences;
  }
  wg.open.push_back(std::move(op));
}

void retire(Warpgroup& wg, const WgmmaOp& op) {
  Worker& k = w();
  for (size_t i = 0; i < op.chunks.size(); ++i) {
    tsan::reads(k.smem + op.chunks[i], 16);
    if (std::memcmp(k.smem + op.chunks[i], &op.bytes[16 * i], 16) != 0) {
      report("shared memory read by a wgmma in flight (offset " + std::to_string(op.chunks[i]) +
             ") was overwritten before the wgmma.wait_group that retires it");
      return;
    }
  }
  const int words = op.n / 2;
  for (int t = 0; t < 128; ++t) {
    const int warp = t / 32, lane = t % 32;
    std::vector<uint32_t>& result = wg.results[op.acc[t]];
    if (!op.has_d_in[t] && static_cast<int>(result.size()) != words) {
      report("emulated wgmma: chained accumulators without a retired predecessor of the same N");
      return;
    }
    result.resize(words);
    for (int i = 0; i < words; ++i) {
      const int row = 16 * warp + lane / 4 + ((i % 4) >= 2 ? 8 : 0);
      const int col = 8 * (i / 4) + 2 * (lane % 4) + (i % 2);
      const double* a = &op.a[static_cast<size_t>(row) * op.k];
      const double* b = &op.b[static_cast<size_t>(col) * op.k];
      const uint32_t in = op.has_d_in[t] ? op.d_in[t * words + i] : result[i];
      uint32_t& reg = result[i];
      if (op.type == WgmmaType::kS8) {
        int64_t sum = 0;
        for (int kk = 0; kk < op.k; ++kk) {
          sum += static_cast<int64_t>(a[kk]) * static_cast<int64_t>(b[kk]);
        }
        reg = (op.scale_d ? in : 0u) + static_cast<uint32_t>(sum);
      } else {
        double sum = 0.0;
        for (int kk = 0; kk < op.k; ++kk) sum += a[kk] * b[kk];
        float d_in;
        std::memcpy(&d_in, &in, 4);
        const float out = static_cast<float>((op.scale_d ? static_cast<double>(d_in) : 0.0) + sum);
        std::memcpy(&reg, &out, 4);
      }
    }
    std::memcpy(op.acc[t], result.data(), words * 4);
    wg.acc_track[op.acc[t]].left = result;
  }
}

}  // namespace

void wgmma_fence() {
  warpgroup_collective("wgmma.fence", [](Warpgroup& wg) { ++wg.fences; });
}

void wgmma_mma(WgmmaType type, int n, uint64_t desc_a, uint64_t desc_b, void* acc, int scale_d,
               const uint32_t* a_frag) {
  Worker& k = w();
  const int g = me().warp / 4;
  if (g < static_cast<int>(k.warpgroups.size())) {
    Warpgroup& wg = k.warpgroups[g];
    if (wg.arrived == 0) {
      wg.desc_a = desc_a;
      wg.desc_b = desc_b;
      wg.scale_d = scale_d;
      wg.type = type;
      wg.n = n;
      wg.a_in_registers = a_frag != nullptr;
    } else if (wg.desc_a != desc_a || wg.desc_b != desc_b || (wg.scale_d != 0) != (scale_d != 0) ||
               wg.type != type || wg.n != n || wg.a_in_registers != (a_frag != nullptr)) {
      report("wgmma.mma_async: descriptors, scale-d, shape or types differ across the warpgroup");
    }
    wg.acc[thread_in_warpgroup()] = acc;
    if (a_frag != nullptr) std::memcpy(wg.a_frag[thread_in_warpgroup()], a_frag, 16);
  }
  warpgroup_collective("wgmma.mma_async", [](Warpgroup& wg) { issue(wg); });
}

void wgmma_commit() {
  warpgroup_collective("wgmma.commit_group", [](Warpgroup& wg) {
    wg.groups.push_back(std::move(wg.open));
    wg.open.clear();
  });
}

void wgmma_wait(int pending_groups) {
  warpgroup_collective("wgmma.wait_group", [pending_groups](Warpgroup& wg) {
    if (!wg.open.empty()) report("wgmma.wait_group with wgmma issued but not committed");
    while (static_cast<int>(wg.groups.size()) > pending_groups) {
      for (const WgmmaOp& op : wg.groups.front()) retire(wg, op);
      wg.groups.pop_front();
    }
  });
}

void device_check_failed(const char* msg) { report(std::string("device-side check failed: ") + msg); }

// ---- mbarrier and TMA (tma_emu.h) ----

namespace {

// The driver's tensor map, in the emulator's own layout inside the 128 opaque bytes.
struct EncodedMap {
  uint32_t magic;
  uint8_t rank, type, interleave, swizzle, oob_fill, elem_bytes;
  uint64_t address;
  uint64_t dims[5];
  uint64_t strides[4];
  uint32_t box[5];
  uint8_t elem_strides[5];
};
static_assert(sizeof(EncodedMap) <= sizeof(CUtensorMap));
constexpr uint32_t kMapMagic = 0x544d4150;  // "TMAP"

int element_bytes(int type) {
  static const int kBytes[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4};
  return type >= 0 && type < static_cast<int>(std::size(kBytes)) ? kBytes[type] : 0;
}

// cuTensorMapEncodeTiled's documented argument rules (cuda.h).
CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* address,
                      const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                      const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                      CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2,
                      CUtensorMapFloatOOBfill oob_fill) {
  const int esize = element_bytes(type);
  const auto addr = reinterpret_cast<uintptr_t>(address);
  const bool i32 = interleave == CU_TENSOR_MAP_INTERLEAVE_32B;
  bool ok = map != nullptr && esize > 0 && rank >= 1 && rank <= 5 && dims != nullptr &&
            box != nullptr && elem_strides != nullptr && (rank == 1 || strides != nullptr) &&
            interleave >= CU_TENSOR_MAP_INTERLEAVE_NONE && interleave <= CU_TENSOR_MAP_INTERLEAVE_32B &&
            swizzle >= CU_TENSOR_MAP_SWIZZLE_NONE && swizzle <= CU_TENSOR_MAP_SWIZZLE_128B &&
            l2 >= CU_TENSOR_MAP_L2_PROMOTION_NONE && l2 <= CU_TENSOR_MAP_L2_PROMOTION_L2_256B &&
            (interleave == CU_TENSOR_MAP_INTERLEAVE_NONE || rank >= 3) &&
            addr % (i32 ? 32 : 16) == 0 && (!i32 || swizzle == CU_TENSOR_MAP_SWIZZLE_32B);
  const bool is_float = type >= CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  ok = ok && (oob_fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE ||
              (oob_fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA && is_float));
  for (cuuint32_t i = 0; ok && i < rank; ++i) {
    ok = dims[i] >= 1 && dims[i] <= (uint64_t{1} << 32) && box[i] >= 1 && box[i] <= 256 &&
         elem_strides[i] >= 1 && elem_strides[i] <= 8;
    if (ok && i + 1 < rank) {
      ok = strides[i] % (i32 ? 32 : 16) == 0 && strides[i] < (uint64_t{1} << 40);
    }
  }
  if (ok && interleave == CU_TENSOR_MAP_INTERLEAVE_NONE) {
    const uint64_t inner = uint64_t{box[0]} * esize;
    ok = inner % 16 == 0 && (swizzle == CU_TENSOR_MAP_SWIZZLE_NONE || inner <= (16u << swizzle));
  }
  if (!ok) return CUDA_ERROR_INVALID_VALUE;
  EncodedMap m{};
  m.magic = kMapMagic;
  m.rank = static_cast<uint8_t>(rank);
  m.type = static_cast<uint8_t>(type);
  m.interleave = static_cast<uint8_t>(interleave);
  m.swizzle = static_cast<uint8_t>(swizzle);
  m.oob_fill = static_cast<uint8_t>(oob_fill);
  m.elem_bytes = static_cast<uint8_t>(esize);
  m.address = addr;
  for (cuuint32_t i = 0; i < rank; ++i) {
    m.dims[i] = dims[i];
    m.box[i] = box[i];
    m.elem_strides[i] = static_cast<uint8_t>(elem_strides[i]);
    if (i + 1 < rank) m.strides[i] = strides[i];
  }
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}

cudaError_t driver_entry_point(const char* symbol, void** func,
                               cudaDriverEntryPointQueryResult* status) {
  const bool known = symbol != nullptr && std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  if (func != nullptr) *func = known ? reinterpret_cast<void*>(&encode_tiled) : nullptr;
  if (status != nullptr) {
    *status = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  }
  return func == nullptr ? cudaErrorInvalidValue : cudaSuccess;
}

const EncodedMap* decode_map(const CUtensorMap* map, const char* what) {
  const auto* m = reinterpret_cast<const EncodedMap*>(map);
  if (map == nullptr || reinterpret_cast<uintptr_t>(map) % 64 != 0 || m->magic != kMapMagic) {
    report(std::string(what) + ": not a 64-byte aligned tensor map made by cuTensorMapEncodeTiled");
    return nullptr;
  }
  return m;
}

// The barrier at `bar`, or null (reported) if none was initialised there.
MBarrier* find_barrier(const uint64_t* bar, const char* what) {
  if (!check_smem(bar, 8, 8, what)) return nullptr;
  Worker& k = w();
  auto it = k.barriers.find(static_cast<uint32_t>(reinterpret_cast<const unsigned char*>(bar) - k.smem));
  if (it == k.barriers.end()) {
    report(std::string(what) + " on shared memory that holds no initialised mbarrier");
    return nullptr;
  }
  return &it->second;
}

// Completes the phase once nothing is pending; wakes the waiters either way.
void settle(MBarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
  }
  ++b.version;
  tsan::release(&b);
}

void land_tma(PendingTma& op) {
  Worker& k = w();
  ProxyView& v = k.proxy;
  for (size_t i = 0; i < op.offsets.size(); ++i) {
    unsigned char* dst = k.smem + op.offsets[i];
    tsan::writes(dst, 16);
    std::memcpy(dst, &op.bytes[16 * i], 16);
    // An async-proxy write: what the async proxy (wgmma) now sees, no fence needed.
    const size_t c = op.offsets[i] / 16;
    v.writer[c] = -1;
    std::memcpy(&v.seen[op.offsets[i]], dst, 16);
    v.seen_at[c] = ++v.clock;
  }
  MBarrier& b = k.barriers[op.bar];
  b.tx -= static_cast<int64_t>(op.bytes.size());
  settle(b);
}

// Lands, in issue order, the loads in flight for which due(load) holds.
template <typename Due>
void land_tma_if(Due&& due) {
  auto& q = w().tma;
  for (size_t i = 0; i < q.size();) {
    if (due(q[i])) {
      tsan::acquire(q[i].bytes.data());
      PendingTma op = std::move(q[i]);
      q.erase(q.begin() + static_cast<std::ptrdiff_t>(i));
      land_tma(op);
    } else {
      ++i;
    }
  }
}

// The loads counted by the barrier at shared offset `bar`.
void land_tma_on(uint32_t bar) {
  land_tma_if([bar](const PendingTma& op) { return op.bar == bar; });
}

uint32_t smem_offset(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - w().smem);
}

}  // namespace

namespace {
// DITKERNELS_EMU_CPASYNC=early: f's loads whose countdown ran out.
void land_tma_due(Fiber& f) {
  land_tma_if([&f](PendingTma& op) { return op.issuer == f.index && op.countdown-- <= 0; });
}
}  // namespace

void mbarrier_init(uint64_t* bar, uint32_t count) {
  if (!check_smem(bar, 8, 8, "mbarrier.init")) return;
  if (count < 1 || count > (1u << 20) - 1) {
    report("mbarrier.init: arrival count " + std::to_string(count) + " outside [1, 2^20 - 1]");
    return;
  }
  MBarrier& b = w().barriers[smem_offset(bar)];
  b = MBarrier{};
  b.expected = b.pending = count;
  tsan::writes(bar, 8);
  std::memset(bar, 0, 8);  // the hardware's state word; nothing should read it
}

void mbarrier_arrive(uint64_t* bar, uint32_t tx_bytes) {
  MBarrier* b = find_barrier(bar, tx_bytes > 0 ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive");
  if (b == nullptr) return;
  b->tx += tx_bytes;
  if (b->tx > (int64_t{1} << 20) - 1) {
    report("mbarrier.arrive.expect_tx: transaction count " + std::to_string(b->tx) +
           " exceeds 2^20 - 1");
    return;
  }
  --b->pending;
  settle(*b);
}

bool mbarrier_test_parity(uint64_t* bar, uint32_t parity) {
  MBarrier* b = find_barrier(bar, "mbarrier.try_wait.parity");
  if (b == nullptr) return true;
  land_tma_on(smem_offset(bar));
  const bool done = (b->phase & 1u) != (parity & 1u);
  if (done) tsan::acquire(b);
  return done;
}

void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  MBarrier* b = find_barrier(bar, "mbarrier.try_wait.parity");
  if (b == nullptr) return;
  Fiber& f = me();
  while (!mbarrier_test_parity(bar, parity)) {
    f.in_mbarrier_wait = true;
    wait_until_changed(&b->version);
    f.in_mbarrier_wait = false;
  }
}

void tma_check_map(const CUtensorMap* map) { decode_map(map, "prefetch.tensormap"); }

void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y) {
  const char* what = "cp.async.bulk.tensor.2d";
  const DeviceProperties& device = *w().launch->device;
  if (device.major < 9) {
    report(std::string(what) + " on an emulated " + device.name + ": TMA needs sm_90");
    return;
  }
  const EncodedMap* m = decode_map(map, what);
  if (m == nullptr) return;
  const bool sw128 = m->swizzle == CU_TENSOR_MAP_SWIZZLE_128B;
  const uint32_t row_bytes = m->box[0] * m->elem_bytes;
  if (m->rank != 2 || m->interleave != CU_TENSOR_MAP_INTERLEAVE_NONE ||
      (m->swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && !(sw128 && row_bytes == 128)) ||
      m->elem_strides[1] != 1) {
    report(std::string(what) + ": only rank-2 tiled maps with unit element strides and no "
           "swizzle, or the 128-byte swizzle on 128-byte box rows, are emulated");
    return;
  }
  const uint32_t bytes = row_bytes * m->box[1];
  if (!check_smem(dst, bytes, 128, what) || find_barrier(bar, what) == nullptr) return;
  Worker& k = w();
  PendingTma op;
  op.bar = smem_offset(bar);
  op.issuer = me().index;
  if (k.launch->early_cp_async) op.countdown = __builtin_ctzll(splitmix64(me().rng) | (1ull << 7));
  op.bytes.assign(bytes, 0);
  const uint32_t window = shared_window_address(dst);
  const auto* base = reinterpret_cast<const unsigned char*>(m->address);
  const int64_t ebytes = m->elem_bytes, per_chunk = 16 / ebytes;
  for (uint32_t r = 0; r < m->box[1]; ++r) {
    const int64_t gy = int64_t{y} + r;
    for (uint32_t c = 0; c < row_bytes / 16; ++c) {
      const uint32_t logical = r * row_bytes + c * 16;
      for (int64_t e = 0; e < per_chunk; ++e) {
        const int64_t gx = int64_t{x} + c * per_chunk + e;
        unsigned char* out = &op.bytes[16 * (op.offsets.size()) + e * ebytes];
        if (gx >= 0 && gy >= 0 && static_cast<uint64_t>(gx) < m->dims[0] &&
            static_cast<uint64_t>(gy) < m->dims[1]) {
          const unsigned char* src = base + gy * m->strides[0] + gx * ebytes;
          tsan::reads(src, ebytes);
          std::memcpy(out, src, ebytes);
        } else if (m->oob_fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA) {
          std::memset(out, 0xff, ebytes);
        }
      }
      uint32_t addr = window + logical;
      if (sw128) addr ^= ((addr >> 7) & 7) << 4;  // CuTe's Swizzle<3, 4, 3> on the address
      op.offsets.push_back(addr - kSharedWindowBase);
    }
  }
  k.tma.push_back(std::move(op));
  // The emulator's own record of the load, allocated here and freed by the thread that
  // lands it: ordered for ThreadSanitizer (an edge from the issue to the landing, which
  // the kernels' own arrive.expect_tx before the load gives them anyway).
  tsan::release(k.tma.back().bytes.data());
  MBarrier& b = k.barriers[k.tma.back().bar];
  ++b.version;  // a waiter re-checks, landing this load
}

const DeviceProperties& device_properties() {
  const char* env = std::getenv("DITKERNELS_EMU_DEVICE");
  const std::string name = env != nullptr && env[0] != '\0' ? env : "h100";
  const DeviceProperties* found = nullptr;
  for (const DeviceProperties& p : kDeviceProfiles) {
    if (name == p.name) found = &p;
  }
  TORCH_CHECK(found != nullptr, "DITKERNELS_EMU_DEVICE must be h100, h200, a100 or sm89, got '",
              name, "'");
  return *found;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > device_properties().sharedMemPerBlockOptin) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(attribute_mutex);
  max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

namespace {

// DITKERNELS_EMU_CPASYNC (unset or "wait": copies land at their wait_group; "early":
// at a random point before it) and DITKERNELS_EMU_SEED; each launch draws its own
// landing points, reproducibly for a given seed and sequence of launches.
void set_landing(LaunchState& state) {
  static std::atomic<uint64_t> launches{0};
  const char* mode = std::getenv("DITKERNELS_EMU_CPASYNC");
  const std::string m = mode != nullptr ? mode : "";
  TORCH_CHECK(m.empty() || m == "wait" || m == "early",
              "DITKERNELS_EMU_CPASYNC must be wait or early, got '", m, "'");
  state.early_cp_async = m == "early";
  const char* seed = std::getenv("DITKERNELS_EMU_SEED");
  uint64_t s = seed != nullptr ? std::strtoull(seed, nullptr, 10) : 0;
  s ^= launches.fetch_add(1) * 0x9e3779b97f4a7c15ull;
  state.seed = splitmix64(s);
}

// DITKERNELS_EMU_LAUNCH_LOG=FILE appends one line per launch: the kernel's offset in
// the library that defines it (kernels live in anonymous namespaces, so they have no
// dynamic symbol; benchmarks/static_report.py names them from the library's symbol
// table), grid, block and dynamic shared memory. That is how the static report learns
// the launch configurations the real launchers choose.
void log_launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes) {
  const char* path = std::getenv("DITKERNELS_EMU_LAUNCH_LOG");
  if (path == nullptr || *path == '\0') return;
  Dl_info info{};
  const uintptr_t base =
      dladdr(kernel, &info) != 0 ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
  static std::mutex log_mutex;
  std::lock_guard<std::mutex> lock(log_mutex);
  FILE* f = std::fopen(path, "a");
  TORCH_CHECK(f != nullptr, "DITKERNELS_EMU_LAUNCH_LOG: cannot open ", path);
  std::fprintf(f, "%s\t0x%zx\t%u,%u,%u\t%u,%u,%u\t%zu\n", info.dli_fname ? info.dli_fname : "?",
               static_cast<size_t>(reinterpret_cast<uintptr_t>(kernel) - base), grid.x, grid.y,
               grid.z, block.x, block.y, block.z, smem_bytes);
  std::fclose(f);
}
}  // namespace

void launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem_bytes,
            const std::function<void()>& body) {
  const int64_t threads = int64_t{block.x} * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64,
              "emulated CUDA launch of ", name, ": invalid block (", block.x, ", ", block.y, ", ",
              block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u &&
                  grid.y <= 65535 && grid.z <= 65535,
              "emulated CUDA launch of ", name, ": invalid grid (", grid.x, ", ", grid.y, ", ",
              grid.z, ")");
  const DeviceProperties& device = device_properties();
  TORCH_CHECK(smem_bytes <= device.sharedMemPerBlockOptin, "emulated CUDA launch of ", name, ": ",
              smem_bytes, " bytes of dynamic shared memory but the emulated ", device.name,
              " allows at most ", device.sharedMemPerBlockOptin);
  size_t allowed = kDefaultDynamicSmem;
  {
    std::lock_guard<std::mutex> lock(attribute_mutex);
    auto it = max_dynamic_smem.find(kernel);
    if (it != max_dynamic_smem.end()) allowed = std::max<size_t>(allowed, it->second);
  }
  TORCH_CHECK(smem_bytes <= allowed, "emulated CUDA launch of ", name, ": ", smem_bytes,
              " bytes of dynamic shared memory but the kernel allows ", allowed,
              " (cudaFuncSetAttribute MaxDynamicSharedMemorySize)");
  log_launch(kernel, grid, block, smem_bytes);

  LaunchState state;
  state.name = name;
  state.grid = grid;
  state.block = block;
  state.smem_bytes = smem_bytes;
  state.device = &device;
  set_landing(state);
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  static const int workers = [] {
    const char* env = std::getenv("DITKERNELS_EMU_THREADS");
    const int n = env != nullptr ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
    return std::max(1, n);
  }();
  const int nthreads = static_cast<int>(std::min<int64_t>(workers, blocks));
  if (nthreads <= 1) {
    run_blocks(state, body, 0, 1);
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < nthreads; ++i) {
      pool.emplace_back([&, i] { run_blocks(state, body, i, nthreads); });
    }
    for (auto& t : pool) t.join();
  }
  TORCH_CHECK(state.error.empty(), "emulated CUDA kernel ", name, " <<<(", grid.x, ", ", grid.y,
              ", ", grid.z, "), (", block.x, ", ", block.y, ", ", block.z, "), ", smem_bytes,
              ">>>: ", state.error);
}

}  // namespace emu
}  // namespace ditkernels

cudaError_t cudaGetDriverEntryPoint(const char* symbol, void** func, unsigned long long,
                                    cudaDriverEntryPointQueryResult* status) {
  return ditkernels::emu::driver_entry_point(symbol, func, status);
}

cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** func, unsigned int,
                                             unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  return ditkernels::emu::driver_entry_point(symbol, func, status);
}
