// The CPU thermal-noise draw of torch's `Tensor.normal_` with a re-seeded CPU generator,
// segment after segment without returning to Python. jit/quant/native_noise.py compiles
// this file on first use and checks its values against torch's before using it.
//
// torch (aten/src/ATen/native/cpu/DistributionTemplates.h, normal_fill, float32, >= 16
// contiguous values) fills a segment with 24-bit uniforms of its mt19937, then turns each
// group of 16 into normals with its AVX2 Box-Muller routine; when the size is not a
// multiple of 16 it draws 16 more uniforms and recomputes the last 16 values. The engine
// below is the reference MT19937 that torch implements (seeded from the low 32 bits of
// the key), producing 624 words per state update so that tempering and the uniform
// conversion run as one vectorisable loop; the vectorised log and sincos come from
// torch's own installed header, so the arithmetic is the same.
#define CPU_CAPABILITY_AVX2
#include <ATen/native/cpu/avx_mathfun.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kStateWords = 624;
constexpr int kShift = 397;
constexpr uint32_t kMatrixA = 0x9908b0dfu;

struct Engine {
  uint32_t state[kStateWords];
  int next = kStateWords;  // the next word to emit; kStateWords: update the state first

  void seed(uint64_t key) {
    state[0] = static_cast<uint32_t>(key);
    for (int j = 1; j < kStateWords; ++j) {
      state[j] = 1812433253u * (state[j - 1] ^ (state[j - 1] >> 30)) + static_cast<uint32_t>(j);
    }
    next = kStateWords;
  }

  static inline uint32_t twist(uint32_t u, uint32_t v) {
    const uint32_t mixed = (u & 0x80000000u) | (v & 0x7fffffffu);
    return (mixed >> 1) ^ ((v & 1u) ? kMatrixA : 0u);
  }

  void update() {
    int j = 0;
    for (; j < kStateWords - kShift; ++j) state[j] = state[j + kShift] ^ twist(state[j], state[j + 1]);
    for (; j < kStateWords - 1; ++j) state[j] = state[j + kShift - kStateWords] ^ twist(state[j], state[j + 1]);
    state[j] = state[j + kShift - kStateWords] ^ twist(state[j], state[0]);
    next = 0;
  }

  // n uniforms in [0, 1) from the low 24 bits of successive tempered words.
  void uniforms(float* out, int64_t n) {
    while (n > 0) {
      if (next == kStateWords) update();
      const int take = static_cast<int>(std::min<int64_t>(n, kStateWords - next));
      const uint32_t* words = state + next;
      for (int i = 0; i < take; ++i) {
        uint32_t y = words[i];
        y ^= (y >> 11);
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= (y >> 18);
        out[i] = static_cast<float>(y & 0xFFFFFFu) * (1.0f / 16777216.0f);
      }
      next += take;
      out += take;
      n -= take;
    }
  }
};

inline void box_muller16(float* data, __m256 std_v) {
  const __m256 u1 = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_loadu_ps(data));  // (0, 1]
  const __m256 u2 = _mm256_loadu_ps(data + 8);
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log256_ps(u1)));
  const __m256 theta = _mm256_mul_ps(_mm256_set1_ps(static_cast<float>(2.0f * 3.14159265358979323846)), u2);
  __m256 sin_theta, cos_theta;
  sincos256_ps(theta, &sin_theta, &cos_theta);
  const __m256 zero = _mm256_setzero_ps();
  _mm256_storeu_ps(data, _mm256_fmadd_ps(_mm256_mul_ps(radius, cos_theta), std_v, zero));
  _mm256_storeu_ps(data + 8, _mm256_fmadd_ps(_mm256_mul_ps(radius, sin_theta), std_v, zero));
}

}  // namespace

extern "C" {

void* jit_noise_stream_new() { return new Engine(); }

void jit_noise_stream_free(void* stream) { delete static_cast<Engine*>(stream); }

// Fills `count` segments laid out back to back from `out` (sizes[i] >= 16 values each)
// with N(0, std^2). Segment i first re-seeds the stream with keys[i] if reseed[i], else
// continues it; the stream keeps its state for the caller's next segments.
void jit_noise_draw(float* out, int64_t count, const int64_t* sizes, const uint64_t* keys,
                    const uint8_t* reseed, float std, void* stream) {
  Engine& engine = *static_cast<Engine*>(stream);
  const __m256 std_v = _mm256_set1_ps(std);
  for (int64_t segment = 0; segment < count; ++segment) {
    const int64_t size = sizes[segment];
    if (reseed[segment]) engine.seed(keys[segment]);
    engine.uniforms(out, size);
    for (int64_t i = 0; i + 16 <= size; i += 16) box_muller16(out + i, std_v);
    if (size % 16 != 0) {
      float* tail = out + size - 16;
      engine.uniforms(tail, 16);
      box_muller16(tail, std_v);
    }
    out += size;
  }
}

}  // extern "C"
