/* bn_sampler: the next token from a row of logits, with llama.cpp's parameters and order (bitnet.h,
 * "sampling").
 *
 * Cost. No step sorts the vocabulary. The candidates are kept as parallel arrays (id, value, weight);
 * top-k and top-p are one "prefix selection": keep the smallest prefix, in the order (value desc,
 * id asc), whose summed weight (1 per token for top-k, exp(value - max) for top-p) reaches a target.
 * It histograms the candidates' values into 256 buckets between their min and max, keeps the buckets
 * above the one where the running sum reaches the target, and repeats on that boundary bucket alone
 * until it holds a few tokens (sorted then) or a single value. Each round is a pass over fewer
 * tokens, so a 128k vocabulary costs a few passes even when the nucleus is most of it.
 *
 * Order of the candidates. The selection moves the tokens it keeps to the front stably, so tokens of
 * equal value always stay in ascending id order; with top-k and top-p off the candidates are in id
 * order. The draw scans them in that order (bitnet.h); bn_sampler_probs reports them sorted. */
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet.h"
#include "error.h"

#define N_BUCKETS 256
/* A boundary bucket this small is sorted instead of split again. */
#define SORT_BELOW 16
/* Tokens per block of the top-k prefilter and of bn_top_logprobs' sums. */
#define BLOCK 64

struct bn_sampler {
    bn_sampler_params p;
    uint32_t n_vocab;
    uint64_t rng[4];    /* xoshiro256** state */
    int32_t *history;   /* [penalty_last_n] ring of the last accepted tokens */
    uint32_t n_history; /* tokens in it */
    uint32_t history_next; /* where the next accepted token goes */
    uint32_t *count;    /* [n_vocab] occurrences in the history; all 0 between calls */
    int32_t *seen;      /* [penalty_last_n] the distinct tokens of the history (scratch) */
    float *bias;        /* [n_vocab] logit bias, 0 where none */
    int32_t *bias_ids;  /* [n_vocab] the tokens with a bias, n_bias of them */
    uint32_t n_bias;
    /* the candidates: n_cand of them, [n_vocab] each; tmp_* hold a boundary bucket while splitting */
    int32_t *id, *tmp_id;
    float *val, *tmp_val; /* values after penalties and bias */
    float *w, *tmp_w;     /* weights */
    uint8_t *bucket;      /* [n_vocab] each candidate's bucket in a selection round */
    uint32_t n_cand;
};

/* ---- RNG: splitmix64 seeds xoshiro256** (both public domain, by Vigna / Blackman and Vigna) ---- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t s[4]) {
    const uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* Uniform in [0, 1): the top 53 bits of one output. */
static double uniform(bn_sampler *s) { return (double)(xoshiro_next(s->rng) >> 11) * 0x1p-53; }

/* ---- construction ---- */

bn_sampler_params bn_sampler_default_params(void) {
    bn_sampler_params p = {0.8f, 40, 0.95f, 0.05f, 1.1f, 0.0f, 0.0f, 64, 0};
    return p;
}

/* A one-line message naming the first parameter out of range, or NULL. NaN fails every check. */
static const char *check_params(const bn_sampler_params *p, uint32_t n_vocab, char *buf, size_t len) {
    if (!(p->temperature >= 0 && p->temperature <= FLT_MAX))
        bn_set_error(buf, len, "temperature must be >= 0 (0 = greedy), got %g", (double)p->temperature);
    else if (p->top_k < 0) bn_set_error(buf, len, "top_k must be >= 0 (0 = off), got %" PRId32, p->top_k);
    else if (!(p->top_p > 0 && p->top_p <= 1)) bn_set_error(buf, len, "top_p must be in (0, 1], got %g", (double)p->top_p);
    else if (!(p->min_p >= 0 && p->min_p <= 1)) bn_set_error(buf, len, "min_p must be in [0, 1], got %g", (double)p->min_p);
    else if (!(p->repeat_penalty > 0 && p->repeat_penalty <= FLT_MAX))
        bn_set_error(buf, len, "repeat_penalty must be > 0 (1 = off), got %g", (double)p->repeat_penalty);
    else if (!isfinite(p->frequency_penalty))
        bn_set_error(buf, len, "frequency_penalty must be finite (0 = off), got %g", (double)p->frequency_penalty);
    else if (!isfinite(p->presence_penalty))
        bn_set_error(buf, len, "presence_penalty must be finite (0 = off), got %g", (double)p->presence_penalty);
    else if (p->penalty_last_n < 0)
        bn_set_error(buf, len, "penalty_last_n must be >= 0 (0 = off), got %" PRId32, p->penalty_last_n);
    else if (n_vocab == 0) bn_set_error(buf, len, "n_vocab must be > 0");
    else return NULL;
    return buf;
}

bn_status bn_sampler_new(const bn_sampler_params *params, uint32_t n_vocab, bn_sampler **out, char *err,
                         size_t err_len) {
    char message[256];
    bn_set_error(err, err_len, "%s", "");
    if (out == NULL || params == NULL) {
        bn_set_error(err, err_len, "bn_sampler_new: params and out must not be NULL");
        return BN_ERR_ARG;
    }
    *out = NULL;
    if (check_params(params, n_vocab, message, sizeof message)) {
        bn_set_error(err, err_len, "%s", message);
        return BN_ERR_ARG;
    }
    bn_sampler *s = calloc(1, sizeof *s);
    if (s == NULL) {
        bn_set_error(err, err_len, "bn_sampler_new: out of memory");
        return BN_ERR_NOMEM;
    }
    s->p = *params;
    s->n_vocab = n_vocab;
    const size_t V = n_vocab, N = params->penalty_last_n ? (size_t)params->penalty_last_n : 1;
    s->history = calloc(N, sizeof *s->history);
    s->seen = calloc(N, sizeof *s->seen);
    s->count = calloc(V, sizeof *s->count);
    s->bias = calloc(V, sizeof *s->bias);
    s->bias_ids = calloc(V, sizeof *s->bias_ids);
    s->id = malloc(V * sizeof *s->id);
    s->tmp_id = malloc(V * sizeof *s->tmp_id);
    s->val = malloc(V * sizeof *s->val);
    s->tmp_val = malloc(V * sizeof *s->tmp_val);
    s->w = malloc(V * sizeof *s->w);
    s->tmp_w = malloc(V * sizeof *s->tmp_w);
    s->bucket = malloc(V * sizeof *s->bucket);
    if (!s->history || !s->seen || !s->count || !s->bias || !s->bias_ids || !s->id || !s->tmp_id || !s->val ||
        !s->tmp_val || !s->w || !s->tmp_w || !s->bucket) {
        bn_sampler_free(s);
        bn_set_error(err, err_len, "bn_sampler_new: out of memory for a vocabulary of %" PRIu32, n_vocab);
        return BN_ERR_NOMEM;
    }
    uint64_t x = params->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
    *out = s;
    return BN_OK;
}

void bn_sampler_free(bn_sampler *s) {
    if (s == NULL) return;
    free(s->history);
    free(s->seen);
    free(s->count);
    free(s->bias);
    free(s->bias_ids);
    free(s->id);
    free(s->tmp_id);
    free(s->val);
    free(s->tmp_val);
    free(s->w);
    free(s->tmp_w);
    free(s->bucket);
    free(s);
}

bn_status bn_sampler_set_logit_bias(bn_sampler *s, const int32_t *tokens, const float *bias, uint32_t n) {
    if (s == NULL || ((tokens == NULL || bias == NULL) && n > 0)) return BN_ERR_ARG;
    for (uint32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= s->n_vocab || isnan(bias[i])) return BN_ERR_ARG;
    for (uint32_t i = 0; i < s->n_bias; i++) s->bias[s->bias_ids[i]] = 0.0f;
    s->n_bias = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (s->bias[tokens[i]] == 0.0f) s->bias_ids[s->n_bias++] = tokens[i]; /* a repeated id: the last wins */
        s->bias[tokens[i]] = bias[i];
    }
    return BN_OK;
}

void bn_sampler_accept(bn_sampler *s, int32_t token) {
    if (s == NULL || s->p.penalty_last_n == 0 || token < 0 || (uint32_t)token >= s->n_vocab) return;
    s->history[s->history_next] = token;
    s->history_next = (s->history_next + 1) % (uint32_t)s->p.penalty_last_n;
    if (s->n_history < (uint32_t)s->p.penalty_last_n) s->n_history++;
}

void bn_sampler_reset(bn_sampler *s) {
    if (s == NULL) return;
    s->n_history = 0;
    s->history_next = 0;
}

/* ---- vectorizable passes (plain loops over 8 lanes, which the compiler turns into SIMD) ---- */

/* The passes below work on the floats' bits with integer operations where a float compare would
 * do: under the default -ftrapping-math the compiler does not turn float compares into SIMD selects. */

static inline uint32_t bits_of(float v) {
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b;
}

static inline float float_of(uint32_t b) {
    float v;
    memcpy(&v, &b, sizeof v);
    return v;
}

/* NaN and -inf count as -FLT_MAX, +inf as FLT_MAX: finite values, so that differences and the
 * selection's bucket ranges stay finite; exp(-FLT_MAX - max) is still 0. */
static inline float sanitize(float v) {
    const uint32_t b = bits_of(v);
    const uint32_t low = 0u - (uint32_t)((b & 0x7fffffffu) > 0x7f800000u || b == 0xff800000u);
    const uint32_t high = 0u - (uint32_t)(b == 0x7f800000u);
    return float_of((b & ~low & ~high) | (0xff7fffffu & low) | (0x7f7fffffu & high));
}

/* A signed integer in the order of the floats (NaN-free; -0 sorts just below +0), and back. */
static inline int32_t order_key(float v) {
    const int32_t b = (int32_t)bits_of(v);
    return b ^ (int32_t)((uint32_t)(b >> 31) & 0x7fffffffu);
}

static inline float key_value(int32_t k) { return float_of((uint32_t)(k ^ (int32_t)((uint32_t)(k >> 31) & 0x7fffffffu))); }

/* The largest of v[n] after sanitize (-FLT_MAX for n = 0). */
static float max_of(const float *v, uint32_t n) {
    int32_t m[8];
    for (int j = 0; j < 8; j++) m[j] = order_key(-FLT_MAX);
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            const int32_t k = order_key(sanitize(v[i + j]));
            m[j] = k > m[j] ? k : m[j];
        }
    for (; i < n; i++) {
        const int32_t k = order_key(sanitize(v[i]));
        m[0] = k > m[0] ? k : m[0];
    }
    for (int j = 1; j < 8; j++) m[0] = m[j] > m[0] ? m[j] : m[0];
    return key_value(m[0]);
}

/* exp(x) for x <= 0 in float, vectorizable: x = n ln2 + r (Cephes' two-part ln2), a degree-7
 * polynomial for exp(r) (Cephes expf, within ~2 ulp), times 2^n built in the exponent bits. Results
 * below ~1.6e-38 (x < -87) and NaN inputs give 0. */
static inline float exp_neg(float x) {
    const uint32_t keep = 0u - (uint32_t)((bits_of(x) & 0x7fffffffu) <= 0x42ae0000u); /* |x| <= 87 */
    const float c = float_of((bits_of(x) & keep) | (0xc2ae0000u & ~keep));          /* else -87 */
    const int32_t n = (int32_t)(c * 1.44269504088896341f - 0.5f); /* truncation of a negative: round c / ln2 */
    const float nf = (float)n;
    const float r = (c - nf * 0.693359375f) - nf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = ((p * r) * r + r + 1.0f) * float_of((uint32_t)(n + 127) << 23);
    return float_of(bits_of(y) & keep);
}

/* w[i] = exp_neg((v[i] - max) / temperature) for i < n. */
static void exp_weights(float *restrict w, const float *restrict v, uint32_t n, float max, float temperature) {
    for (uint32_t i = 0; i < n; i++) w[i] = exp_neg((v[i] - max) / temperature);
}

/* sum(w[n]) in double, over 8 partial sums. */
static double sum_of(const float *w, uint32_t n) {
    double sum[8] = {0};
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) sum[j] += w[i + j];
    for (; i < n; i++) sum[0] += w[i];
    return ((sum[0] + sum[4]) + (sum[2] + sum[6])) + ((sum[1] + sum[5]) + (sum[3] + sum[7]));
}

/* ---- the filters ---- */

/* val[i] = logits[i] after the penalties and the bias (sanitized), for every token. */
static void apply_penalties_and_bias(bn_sampler *s, const float *logits) {
    const bn_sampler_params *p = &s->p;
    for (uint32_t i = 0; i < s->n_vocab; i++) s->val[i] = sanitize(logits[i]);
    uint32_t n_seen = 0;
    for (uint32_t i = 0; i < s->n_history; i++)
        if (s->count[s->history[i]]++ == 0) s->seen[n_seen++] = s->history[i];
    for (uint32_t i = 0; i < n_seen; i++) {
        const int32_t t = s->seen[i];
        const uint32_t c = s->count[t];
        float v = s->val[t];
        v = v <= 0 ? v * p->repeat_penalty : v / p->repeat_penalty; /* llama.cpp's order and float steps */
        s->val[t] = sanitize(v - ((float)c * p->frequency_penalty + (float)(c > 0) * p->presence_penalty));
        s->count[t] = 0;
    }
    for (uint32_t i = 0; i < s->n_bias; i++) {
        const int32_t t = s->bias_ids[i];
        s->val[t] = sanitize(s->val[t] + s->bias[t]);
    }
}

/* The first index of the largest of v[n] (NaN-free). */
static uint32_t argmax(const float *v, uint32_t n) {
    const float max = max_of(v, n);
    uint32_t i = 0;
    while (i + 1 < n && v[i] != max) i++;
    return i;
}

/* The top-k candidates' superset {v >= t}, in id order, into id/val [n_cand], with t the k-th largest
 * of the maxima of blocks of BLOCK tokens: k blocks hold a value >= t, so at least k tokens pass,
 * and every one of the k largest does. Falls back to all tokens when there are too few blocks. */
static void top_k_candidates(bn_sampler *s, uint32_t k) {
    const uint32_t V = s->n_vocab, n_blocks = (V + BLOCK - 1) / BLOCK;
    float t = -INFINITY;
    if (k <= n_blocks / 4) { /* the k largest block maxima, sorted descending in tmp_val[0..k) */
        float *top = s->tmp_val;
        uint32_t found = 0;
        for (uint32_t b = 0; b < n_blocks; b++) {
            const uint32_t lo = b * BLOCK, n = V - lo < BLOCK ? V - lo : BLOCK;
            const float m = max_of(s->val + lo, n);
            if (found == k && !(m > top[k - 1])) continue;
            uint32_t j = found < k ? found++ : k - 1;
            for (; j > 0 && m > top[j - 1]; j--) top[j] = top[j - 1];
            top[j] = m;
        }
        t = top[k - 1];
    }
    uint32_t n = 0;
    for (uint32_t i = 0; i < V; i++) { /* in place (n <= i), without a branch */
        const float v = s->val[i];
        s->val[n] = v;
        s->id[n] = (int32_t)i;
        n += v >= t;
    }
    s->n_cand = n;
}

/* Whether candidate a comes before b: larger value first, then the lower id. */
static inline int before(float va, int32_t ia, float vb, int32_t ib) { return va > vb || (va == vb && ia < ib); }

/* Sorts candidates [a, b) into (value desc, id asc) order; for a few tokens only. */
static void insertion_sort(bn_sampler *s, uint32_t a, uint32_t b, int weighted) {
    for (uint32_t i = a + 1; i < b; i++) {
        const int32_t id = s->id[i];
        const float v = s->val[i], w = weighted ? s->w[i] : 0.0f;
        uint32_t j = i;
        for (; j > a && before(v, id, s->val[j - 1], s->id[j - 1]); j--) {
            s->id[j] = s->id[j - 1];
            s->val[j] = s->val[j - 1];
            if (weighted) s->w[j] = s->w[j - 1];
        }
        s->id[j] = id;
        s->val[j] = v;
        if (weighted) s->w[j] = w;
    }
}

/* Keeps the smallest prefix of the candidates, in (value desc, id asc) order, whose summed weight
 * (s->w when weighted, else 1 per token) reaches target; all of them when the total falls short.
 * The kept tokens move to the front stably (module comment). */
static void select_prefix(bn_sampler *s, double target, int weighted) {
    uint32_t kept = 0, a = 0, b = s->n_cand; /* kept: [0, kept); still undecided: [a, b) */
    for (;;) {
        int32_t lo_key = order_key(s->val[a]), hi_key = lo_key;
        for (uint32_t i = a; i < b; i++) {
            const int32_t k = order_key(s->val[i]);
            lo_key = k < lo_key ? k : lo_key;
            hi_key = k > hi_key ? k : hi_key;
        }
        const float lo = key_value(lo_key), hi = key_value(hi_key);
        if (b - a < SORT_BELOW || lo == hi) { /* equal values are in id order already */
            if (lo != hi) insertion_sort(s, a, b, weighted);
            double sum = 0;
            uint32_t i = a;
            for (; i < b && sum < target; i++) sum += weighted ? (double)s->w[i] : 1.0;
            memmove(s->id + kept, s->id + a, (i - a) * sizeof *s->id);
            memmove(s->val + kept, s->val + a, (i - a) * sizeof *s->val);
            if (weighted) memmove(s->w + kept, s->w + a, (i - a) * sizeof *s->w);
            s->n_cand = kept + (i - a);
            return;
        }
        /* bucket of v: floor((hi - v) * scale), 0 for hi, N_BUCKETS - 1 for lo */
        const double scale = N_BUCKETS / ((double)hi - (double)lo);
        double mass[2][N_BUCKETS] = {{0}}; /* two halves, for shorter dependency chains */
        for (uint32_t i = a; i < b; i++) {
            const uint32_t k = (uint32_t)(((double)hi - (double)s->val[i]) * scale);
            s->bucket[i] = (uint8_t)(k < N_BUCKETS ? k : N_BUCKETS - 1);
            mass[i & 1][s->bucket[i]] += weighted ? (double)s->w[i] : 1.0;
        }
        for (uint32_t k = 0; k < N_BUCKETS; k++) mass[0][k] += mass[1][k];
        uint32_t boundary = 0;
        double above = 0;
        while (boundary < N_BUCKETS && above + mass[0][boundary] < target) above += mass[0][boundary++];
        if (boundary == N_BUCKETS) { /* rounding: the total fell short of the target, keep everything */
            memmove(s->id + kept, s->id + a, (b - a) * sizeof *s->id);
            memmove(s->val + kept, s->val + a, (b - a) * sizeof *s->val);
            if (weighted) memmove(s->w + kept, s->w + a, (b - a) * sizeof *s->w);
            s->n_cand = kept + (b - a);
            return;
        }
        /* the buckets above the boundary join the kept tokens (in place: kept <= i), the boundary
         * bucket goes to tmp_* and comes back right after them */
        uint32_t n_tmp = 0;
        for (uint32_t i = a; i < b; i++) {
            const uint32_t k = s->bucket[i];
            if (k < boundary) {
                s->id[kept] = s->id[i], s->val[kept] = s->val[i];
                if (weighted) s->w[kept] = s->w[i];
                kept++;
            } else if (k == boundary) {
                s->tmp_id[n_tmp] = s->id[i], s->tmp_val[n_tmp] = s->val[i];
                if (weighted) s->tmp_w[n_tmp] = s->w[i];
                n_tmp++;
            }
        }
        memcpy(s->id + kept, s->tmp_id, n_tmp * sizeof *s->id);
        memcpy(s->val + kept, s->tmp_val, n_tmp * sizeof *s->val);
        if (weighted) memcpy(s->w + kept, s->tmp_w, n_tmp * sizeof *s->w);
        a = kept, b = kept + n_tmp;
        target -= above;
    }
}

/* Runs the filters on a row of logits. Returns -1 with the candidates and their final weights in
 * s->id / s->w [s->n_cand] (zero weights included) and their total in *total; or, for greedy
 * sampling or when every value is -inf or NaN, the token to return. */
static int32_t filter(bn_sampler *s, const float *logits, double *total) {
    const bn_sampler_params *p = &s->p;
    apply_penalties_and_bias(s, logits);
    const float max = max_of(s->val, s->n_vocab);
    if (p->temperature == 0 || max == -FLT_MAX) return (int32_t)argmax(s->val, s->n_vocab); /* or none left */
    if (p->top_k > 0 && (uint32_t)p->top_k < s->n_vocab) {
        top_k_candidates(s, (uint32_t)p->top_k);
        if (s->n_cand > (uint32_t)p->top_k) select_prefix(s, (double)p->top_k, 0);
    } else {
        for (uint32_t i = 0; i < s->n_vocab; i++) s->id[i] = (int32_t)i;
        s->n_cand = s->n_vocab;
    }
    const int at_t1 = p->top_p < 1 || p->min_p > 0 || p->temperature == 1;
    if (at_t1) { /* softmax numerators at temperature 1; the largest is exp(0) = 1 */
        exp_weights(s->w, s->val, s->n_cand, max, 1.0f);
        const double sum = sum_of(s->w, s->n_cand);
        /* One pass keeps the tokens with w_i >= floor:
         * - min-p keeps p_i >= min_p * p_max, i.e. w_i >= min_p. Applied before top-p it gives the same
         *   set: both keep a prefix of the (value desc) order, so the result is the shorter one, and
         *   top-p's prefix is then found among these tokens with the mass of all the candidates.
         * - for top-p alone, tokens with w_i < half of (1 - top_p) * sum / n can be dropped first: all
         *   of them weigh less than (1 - top_p) * sum, so the rest reaches the target by itself. */
        float floor = p->min_p;
        if (p->top_p < 1) {
            const float prune = (float)(0.5 * (1.0 - (double)p->top_p) * sum / s->n_cand);
            floor = prune > floor ? prune : floor;
        }
        if (floor > 0) {
            uint32_t n = 0;
            for (uint32_t i = 0; i < s->n_cand; i++) { /* in place (n <= i), without a branch */
                const float w = s->w[i];
                s->id[n] = s->id[i], s->val[n] = s->val[i], s->w[n] = w;
                n += w >= floor;
            }
            s->n_cand = n;
        }
        if (p->top_p < 1) select_prefix(s, (double)p->top_p * sum, 1);
    }
    if (p->temperature != 1) exp_weights(s->w, s->val, s->n_cand, max, p->temperature);
    *total = sum_of(s->w, s->n_cand);
    return -1;
}

int32_t bn_sampler_sample(bn_sampler *s, const float *logits) {
    if (s == NULL || logits == NULL) return -1;
    double total;
    const int32_t token = filter(s, logits, &total);
    if (token >= 0) return token;
    const double target = uniform(s) * total;
    double sum = 0;
    for (uint32_t b = 0; b < s->n_cand; b += BLOCK) { /* whole blocks first, then the one that crosses */
        const uint32_t n = s->n_cand - b < BLOCK ? s->n_cand - b : BLOCK;
        const double block = sum_of(s->w + b, n);
        if (sum + block <= target) {
            sum += block;
            continue;
        }
        for (uint32_t i = b; i < b + n; i++) {
            sum += s->w[i];
            if (sum > target) return s->id[i];
        }
    }
    for (uint32_t i = s->n_cand; i-- > 0;) /* rounding left the target unreached: the last with weight */
        if (s->w[i] > 0) return s->id[i];
    return s->id[0];
}

/* qsort order of (probability desc, id asc) for bn_sampler_probs. */
typedef struct {
    float prob;
    int32_t id;
} prob_entry;

static int by_prob(const void *a, const void *b) {
    const prob_entry *x = a, *y = b;
    if (x->prob != y->prob) return x->prob > y->prob ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

bn_status bn_sampler_probs(bn_sampler *s, const float *logits, int32_t *ids, float *probs, uint32_t cap,
                           uint32_t *n) {
    if (s == NULL || logits == NULL || n == NULL || ((ids == NULL || probs == NULL) && cap > 0)) return BN_ERR_ARG;
    double total;
    const int32_t token = filter(s, logits, &total);
    if (token >= 0) {
        *n = 1;
        if (cap > 0) ids[0] = token, probs[0] = 1.0f;
        return BN_OK;
    }
    prob_entry *entries = malloc(((size_t)s->n_cand + 1) * sizeof *entries);
    if (entries == NULL) return BN_ERR_NOMEM;
    uint32_t count = 0;
    for (uint32_t i = 0; i < s->n_cand; i++)
        if (s->w[i] > 0) entries[count].prob = (float)(s->w[i] / total), entries[count++].id = s->id[i];
    qsort(entries, count, sizeof *entries, by_prob);
    *n = count;
    for (uint32_t i = 0; i < count && i < cap; i++) ids[i] = entries[i].id, probs[i] = entries[i].prob;
    free(entries);
    return BN_OK;
}

bn_status bn_top_logprobs(const float *logits, uint32_t n_vocab, uint32_t n, int32_t *ids, float *logprobs) {
    if (logits == NULL || n > n_vocab || ((ids == NULL || logprobs == NULL) && n > 0)) return BN_ERR_ARG;
    const float max = max_of(logits, n_vocab); /* NaNs ignored, and exp_neg sends them to 0 */
    double z = 0; /* sum(exp(logits - max)), a block at a time */
    for (uint32_t i = 0; i < n_vocab; i += BLOCK) {
        float e[BLOCK];
        const uint32_t n_block = n_vocab - i < BLOCK ? n_vocab - i : BLOCK;
        exp_weights(e, logits + i, n_block, max, 1.0f);
        z += sum_of(e, n_block);
    }
    const float log_z = max + (float)log(z);
    /* ids[0..found) sorted (logit desc, id asc): insert each token that beats the last kept one */
    uint32_t found = 0;
    for (uint32_t i = 0; i < n_vocab && n > 0; i++) {
        const float v = logits[i];
        if (isnan(v) || (found == n && !before(v, (int32_t)i, logits[ids[n - 1]], ids[n - 1]))) continue;
        uint32_t j = found < n ? found++ : n - 1;
        for (; j > 0 && before(v, (int32_t)i, logits[ids[j - 1]], ids[j - 1]); j--) ids[j] = ids[j - 1];
        ids[j] = (int32_t)i;
    }
    for (uint32_t j = 0; j < found; j++) logprobs[j] = logits[ids[j]] - log_z;
    for (uint32_t j = found; j < n; j++) ids[j] = -1, logprobs[j] = -INFINITY;
    return BN_OK;
}
