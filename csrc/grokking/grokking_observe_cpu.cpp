// glrec::grokking_observe on CPU: one GrokkingMonitor update (glrec_fast/grokking.py) in one call.
//
// The pure-torch reference (grokking.observe_reference) is ~150 tiny elementwise ops on
// [num_branches] vectors: ~400 us of dispatch overhead per observe() on the 2-core CI machine, a
// few percent of a ml-100k-sized training step. Here one loop over the branches does the same
// arithmetic, line for line and in the same order and precision (scalar(T) casts, torch's lerp
// formula), so decisions match the reference; the call costs a few microseconds.
//
// Layouts (all contiguous, checked below):
//   state       [17, B] float/double, rows as STATE_ROWS in grokking.py
//   ring        [window, 3, B]   levels (train EMA, weight-norm EMA, last val) of past calls
//   event_buf   [max_events + B, 10] float64, rows as EVENT_FIELDS; event_count int64 0-dim
//   history_row [10, B] (HISTORY_FIELDS) or empty (no history)
//   vals        [3, B] train loss, weight norm, val metric (NaN: not observed)
//   config      17 floats in KERNEL_CONFIG order
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace glrec {
namespace {

constexpr int64_t kStateRows = 17;
constexpr int64_t kEventFields = 10;
constexpr int64_t kHistoryFields = 10;
constexpr int64_t kConfigSize = 17;
enum Cfg {
  kEmaAlpha, kFitRatio, kFlatTol, kPatience, kMinJump, kDrift, kThreshold, kDriftSigmas, kJumpSigmas,
  kThresholdSigmas, kWeightNormTol, kWeightNormDiscount, kRefractory, kRespond, kPriorStep, kPriorBound,
  kMaxEvents
};
enum Row {
  kTrainEma, kWnEma, kValLast, kSeenTrain, kSeenWn, kSeenVal, kTrainInit, kFitRun, kNoiseVar, kPhN, kPhMean,
  kPhUp, kPhDown, kPhUpMin, kPhDownMin, kRefractoryLeft, kPrior
};

// torch.lerp's formula (ATen/native/Lerp.h), so EMAs round exactly like the reference.
template <typename T>
inline T lerp(T self, T end, T w) {
  return std::abs(w) < T(0.5) ? self + w * (end - self) : end - (end - self) * (T(1) - w);
}

template <typename T>
inline T clamp_nan(T v, T lo, T hi) {  // torch.clamp: NaN stays NaN
  return std::isnan(v) ? v : std::min(std::max(v, lo), hi);
}

template <typename T>
inline T minimum(T a, T b) {  // torch.minimum: NaN propagates
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<T>::quiet_NaN() : std::min(a, b);
}

template <typename T>
void observe(T* S, T* ring_slot, double* events, int64_t* event_count, T* hist, const T* V, const double* cfg,
             int64_t B, int64_t step) {
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T alpha = T(cfg[kEmaAlpha]);
  const int64_t E = static_cast<int64_t>(cfg[kMaxEvents]);
  int64_t next = *event_count;
  auto st = [&](int r, int64_t b) -> T& { return S[r * B + b]; };
  for (int64_t b = 0; b < B; ++b) {
    // EMAs of train loss and weight norm; the val row keeps the last value.
    T v[3], lv[3];
    bool ok[3], first[3];
    for (int r = 0; r < 3; ++r) {
      v[r] = V[r * B + b];
      ok[r] = std::abs(v[r]) < inf;
      first[r] = ok[r] && st(kSeenTrain + r, b) == T(0);
      const T smoothed = r < 2 ? lerp(st(r, b), v[r], alpha) : v[r];
      lv[r] = ok[r] ? (first[r] ? v[r] : smoothed) : st(r, b);
    }
    const T tl = v[0], x = v[2];
    const bool ok_t = ok[0], ok_v = ok[2];
    const T val_last = st(kValLast, b);
    const T init = first[0] ? tl : st(kTrainInit, b);
    const T ema_old = ring_slot[b], wn_old = ring_slot[B + b], val_old = ring_slot[2 * B + b];
    const T ema = lv[0], wn_ema = lv[1];

    // 1. fit: low and flat training loss; armed = fit for `patience` calls before this one.
    const T scale = std::abs(init);
    const bool fit_now = ema <= T(cfg[kFitRatio]) * scale && std::abs(ema - ema_old) <= T(cfg[kFlatTol]) * scale;
    const T fit_run = st(kFitRun, b);
    const bool armed = fit_run >= T(cfg[kPatience]);
    const T new_fit_run = ok_t ? (fit_now ? fit_run + T(1) : T(0)) : fit_run;

    // 3. weight-norm evidence.
    const T wn_change = wn_ema / wn_old - T(1);
    const bool falling = wn_change < T(-cfg[kWeightNormTol]);

    // Noise from winsorised successive differences; effective thresholds.
    const T noise_var = st(kNoiseVar, b);
    const T sigma = std::sqrt(noise_var * T(0.5));
    const T lim = sigma * T(4.0) + T(0.5 * cfg[kMinJump]);
    const T d = clamp_nan(x - val_last, -lim, lim);
    const T new_noise = std::abs(d) < inf ? lerp(noise_var, d * d, T(0.1)) : noise_var;
    const T drift = std::max(sigma * T(cfg[kDriftSigmas]), T(cfg[kDrift]));
    const T min_jump = std::max(sigma * T(cfg[kJumpSigmas]), T(cfg[kMinJump]));
    const T thr_dn = std::max(sigma * T(cfg[kThresholdSigmas]), T(cfg[kThreshold]));
    const T thr_up = falling ? thr_dn * T(cfg[kWeightNormDiscount]) : thr_dn;

    // 2. two-sided Page-Hinkley against the running mean since arming.
    const T refractory_left = st(kRefractoryLeft, b);
    const bool active = ok_v && armed && refractory_left <= T(0);
    const T ph_n = st(kPhN, b), ph_mean = st(kPhMean, b);
    const T n1 = ph_n + T(1);
    const T jump = x - ph_mean;
    const T mean = ph_n > T(0) ? ph_mean + jump / n1 : x;
    const T dev = x - mean;
    const T m_up = st(kPhUp, b) + dev - drift;
    const T m_dn = st(kPhDown, b) - dev - drift;
    const T m_up_min = minimum(st(kPhUpMin, b), m_up);
    const T m_dn_min = minimum(st(kPhDownMin, b), m_dn);
    const T stat_up = m_up - m_up_min, stat_dn = m_dn - m_dn_min;
    const bool grok = active && stat_up > thr_up && jump > min_jump;
    const bool ungrok = active && stat_dn > thr_dn && jump < -min_jump;
    const bool fired = grok || ungrok;

    // Restart where not armed, refractory, or just fired.
    const bool keep = active && !fired;
    const bool restart = ok_v && !keep;
    auto pick = [&](T updated, T fresh, T old) { return keep ? updated : (restart ? fresh : old); };
    const T new_ph_n = pick(n1, T(1), ph_n), new_ph_mean = pick(mean, x, ph_mean);
    const T new_up = pick(m_up, T(0), st(kPhUp, b)), new_dn = pick(m_dn, T(0), st(kPhDown, b));
    const T new_up_min = pick(m_up_min, T(0), st(kPhUpMin, b)), new_dn_min = pick(m_dn_min, T(0), st(kPhDownMin, b));
    // 4. refractory counts down only on calls whose metric has settled.
    const bool settled = std::abs(x - val_old) <= drift + T(4.0) * sigma;
    const T left = (ok_v && settled) ? std::max(refractory_left - T(1), T(0)) : refractory_left;
    const T new_left = fired ? T(cfg[kRefractory]) : left;

    T new_prior = st(kPrior, b);
    if (cfg[kRespond] != 0.0) {
      const T move = (T(grok ? 1 : 0) - T(ungrok ? 1 : 0)) * T(cfg[kPriorStep]);
      new_prior = std::min(std::max(new_prior + move, T(-cfg[kPriorBound])), T(cfg[kPriorBound]));
    }

    if (fired) {
      double* rec = events + ((next % E + E) % E) * kEventFields;
      ++next;
      const double values[kEventFields] = {double(step), double(b), ungrok ? 1.0 : 0.0, double(jump), double(x),
                                           double(ph_mean), double(ungrok ? stat_dn : stat_up),
                                           double(ungrok ? thr_dn : thr_up), double(wn_change), double(new_prior)};
      std::copy(values, values + kEventFields, rec);
    }
    if (hist != nullptr) {
      const T row[kHistoryFields] = {tl, v[1], x, ema, wn_ema, armed ? ph_mean : nan, stat_up, stat_dn,
                                     T(armed ? 1 : 0), new_prior};
      for (int64_t f = 0; f < kHistoryFields; ++f) hist[f * B + b] = row[f];
    }
    for (int r = 0; r < 3; ++r) {
      ring_slot[r * B + b] = lv[r];
      st(r, b) = lv[r];
      st(kSeenTrain + r, b) += T(ok[r] ? 1 : 0);
    }
    st(kTrainInit, b) = init;
    st(kFitRun, b) = new_fit_run;
    st(kNoiseVar, b) = new_noise;
    st(kPhN, b) = new_ph_n;
    st(kPhMean, b) = new_ph_mean;
    st(kPhUp, b) = new_up;
    st(kPhDown, b) = new_dn;
    st(kPhUpMin, b) = new_up_min;
    st(kPhDownMin, b) = new_dn_min;
    st(kRefractoryLeft, b) = new_left;
    st(kPrior, b) = new_prior;
  }
  *event_count = next;
}

void grokking_observe_cpu(const at::Tensor& state, const at::Tensor& ring, const at::Tensor& event_buf,
                          const at::Tensor& event_count, const at::Tensor& history_row, const at::Tensor& vals,
                          at::ArrayRef<double> config, int64_t step, int64_t slot) {
  TORCH_CHECK(state.dim() == 2 && state.size(0) == kStateRows && state.is_contiguous(),
              "grokking_observe: state must be a contiguous [", kStateRows, ", num_branches] tensor, got ",
              state.sizes());
  const int64_t B = state.size(1);
  const auto dtype = state.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "grokking_observe: state must be float32 or float64, got ",
              dtype);
  TORCH_CHECK(ring.dim() == 3 && ring.size(1) == 3 && ring.size(2) == B && ring.is_contiguous() &&
                  ring.scalar_type() == dtype,
              "grokking_observe: ring must be a contiguous [window, 3, ", B, "] tensor of ", dtype, ", got ",
              ring.sizes(), " ", ring.scalar_type());
  TORCH_CHECK(slot >= 0 && slot < ring.size(0), "grokking_observe: slot must be in [0, ", ring.size(0), "), got ",
              slot);
  TORCH_CHECK(vals.dim() == 2 && vals.size(0) == 3 && vals.size(1) == B && vals.is_contiguous() &&
                  vals.scalar_type() == dtype,
              "grokking_observe: vals must be a contiguous [3, ", B, "] tensor of ", dtype, ", got ", vals.sizes(),
              " ", vals.scalar_type());
  TORCH_CHECK(static_cast<int64_t>(config.size()) == kConfigSize, "grokking_observe: config must hold ",
              kConfigSize, " floats (KERNEL_CONFIG), got ", config.size());
  const int64_t E = static_cast<int64_t>(config[kMaxEvents]);
  TORCH_CHECK(E >= 1, "grokking_observe: config max_events must be >= 1, got ", config[kMaxEvents]);
  TORCH_CHECK(event_buf.dim() == 2 && event_buf.size(0) == E + B && event_buf.size(1) == kEventFields &&
                  event_buf.is_contiguous() && event_buf.scalar_type() == at::kDouble,
              "grokking_observe: event_buf must be a contiguous float64 [", E + B, ", ", kEventFields,
              "] tensor, got ", event_buf.sizes(), " ", event_buf.scalar_type());
  TORCH_CHECK(event_count.dim() == 0 && event_count.scalar_type() == at::kLong,
              "grokking_observe: event_count must be a 0-dim int64 tensor, got ", event_count.sizes(), " ",
              event_count.scalar_type());
  const bool record = history_row.numel() > 0;
  TORCH_CHECK(!record || (history_row.dim() == 2 && history_row.size(0) == kHistoryFields &&
                          history_row.size(1) == B && history_row.is_contiguous() &&
                          history_row.scalar_type() == dtype),
              "grokking_observe: history_row must be empty or a contiguous [", kHistoryFields, ", ", B,
              "] tensor of ", dtype, ", got ", history_row.sizes(), " ", history_row.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(dtype, "grokking_observe", [&] {
    observe<scalar_t>(state.data_ptr<scalar_t>(), ring.data_ptr<scalar_t>() + slot * 3 * B,
                      event_buf.data_ptr<double>(), event_count.data_ptr<int64_t>(),
                      record ? history_row.data_ptr<scalar_t>() : nullptr, vals.data_ptr<scalar_t>(),
                      config.data(), B, step);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(glrec, CPU, m) {
  m.impl("grokking_observe", &grokking_observe_cpu);
}

}  // namespace glrec
