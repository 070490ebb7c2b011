//! Greedy and beam-search decoding, step for step what transformers' `generate` does for an
//! encoder-decoder model with batch size 1 (transformers 5.x `_sample` / `_beam_search`).
//!
//! Logits processors, in transformers' order: no-repeat-n-gram, forced BOS (at length 1), forced
//! EOS (at `max_length - 1`). Greedy applies them to the raw logits and takes the first argmax;
//! beam search applies them to `log_softmax(logits)` (f32), keeps the top `2·num_beams`
//! continuations, carries the best `num_beams` unfinished ones on, and keeps the best `num_beams`
//! finished hypotheses scored `sum_logprobs / generated_len^length_penalty`. The ±1e9 sentinels of
//! transformers are reproduced in f32 because they decide ties between placeholder entries.

use candle_core::{Device, Result, Tensor};

use super::config::{EarlyStopping, GenerationConfig};
use super::language::{DecoderCache, LanguageModel};

/// transformers' "very negative" score for placeholders and excluded candidates.
const NEG: f32 = -1.0e9;

/// Something that extends every live sequence by one token and returns the next-token logits.
pub trait StepDecoder {
    /// `tokens[i]` is the newest token of sequence `i`; returns one f32 logits row per sequence.
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
    /// Sequence `i` continues from what sequence `idx[i]` was.
    fn reorder(&mut self, idx: &[u32]) -> Result<()>;
}

/// The BART decoder with its KV cache over one encoded image.
pub struct CachedDecoder<'a> {
    lm: &'a LanguageModel,
    cache: DecoderCache,
    device: Device,
}

impl<'a> CachedDecoder<'a> {
    pub fn new(lm: &'a LanguageModel, encoder_out: &Tensor, batch: usize) -> Result<Self> {
        Ok(Self {
            lm,
            cache: lm.new_cache(encoder_out, batch)?,
            device: encoder_out.device().clone(),
        })
    }
}

impl StepDecoder for CachedDecoder<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(1)?;
        let h = self.lm.decode(&ids, &mut self.cache)?;
        self.lm.last_logits(&h)?.to_vec2::<f32>()
    }

    fn reorder(&mut self, idx: &[u32]) -> Result<()> {
        self.cache.reorder(idx)
    }
}

/// Applies the logits processors to `scores` of a sequence `seq` (decoder start token included).
pub fn process_logits(scores: &mut [f32], seq: &[u32], cfg: &GenerationConfig, max_length: usize) {
    let cur_len = seq.len();
    let n = cfg.no_repeat_ngram_size;
    if n > 0 && cur_len >= n {
        let prefix = &seq[cur_len + 1 - n..];
        for start in 0..=(cur_len - n) {
            let window = &seq[start..start + n];
            if window[..n - 1] == *prefix
                && let Some(s) = scores.get_mut(window[n - 1] as usize)
            {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    let force = |scores: &mut [f32], tok: u32| {
        scores.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
        if let Some(s) = scores.get_mut(tok as usize) {
            *s = 0.0;
        }
    };
    if let Some(bos) = cfg.forced_bos_token_id
        && cur_len == 1
    {
        force(scores, bos);
    }
    if let Some(eos) = cfg.forced_eos_token_id
        && cur_len + 1 == max_length
    {
        force(scores, eos);
    }
}

/// `log_softmax` of one row (sum in f64, result in f32).
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return x.iter().map(|_| f32::NAN).collect();
    }
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = sum.ln();
    x.iter().map(|&v| ((v - max) as f64 - lse) as f32).collect()
}

/// Indices of the `k` largest values, best first; ties go to the lower index.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let better = |a: usize, b: usize| values[a] > values[b] || (values[a] == values[b] && a < b);
    let mut top: Vec<usize> = Vec::with_capacity(k + 1);
    for (i, v) in values.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if top.len() == k && !better(i, top[k - 1]) {
            continue;
        }
        let pos = top.iter().position(|&j| better(i, j)).unwrap_or(top.len());
        top.insert(pos, i);
        top.truncate(k);
    }
    top
}

fn check(cfg: &GenerationConfig) -> Result<()> {
    if cfg.max_new_tokens == 0 {
        candle_core::bail!("max_new_tokens must be at least 1");
    }
    if cfg.num_beams == 0 {
        candle_core::bail!("num_beams must be at least 1");
    }
    Ok(())
}

/// Greedy decoding. Returns the decoder sequence, start token first.
pub fn greedy<D: StepDecoder>(dec: &mut D, cfg: &GenerationConfig) -> Result<Vec<u32>> {
    check(cfg)?;
    let max_length = 1 + cfg.max_new_tokens;
    let mut seq = vec![cfg.decoder_start_token_id];
    while seq.len() < max_length {
        let last = seq[seq.len() - 1];
        let mut rows = dec.step(&[last])?;
        let Some(scores) = rows.get_mut(0) else {
            candle_core::bail!("decoder returned no logits")
        };
        process_logits(scores, &seq, cfg, max_length);
        let next = top_k(scores, 1)
            .first()
            .copied()
            .unwrap_or(cfg.eos_token_id as usize) as u32;
        seq.push(next);
        if next == cfg.eos_token_id {
            break;
        }
    }
    Ok(seq)
}

/// Beam search. Returns the best finished hypothesis, start token first.
pub fn beam_search<D: StepDecoder>(dec: &mut D, cfg: &GenerationConfig) -> Result<Vec<u32>> {
    check(cfg)?;
    let nb = cfg.num_beams;
    let prompt_len = 1usize;
    let max_length = prompt_len + cfg.max_new_tokens;
    let k = 2 * nb; // max(2, 1 + number of eos tokens) * num_beams
    let lp = cfg.length_penalty;
    let early = cfg.early_stopping;

    let mut running: Vec<Vec<u32>> = vec![vec![cfg.decoder_start_token_id]; nb];
    let mut running_scores: Vec<f32> = (0..nb).map(|i| if i == 0 { 0.0 } else { NEG }).collect();
    let mut finished: Vec<Vec<u32>> = running.clone();
    let mut finished_scores = vec![NEG; nb];
    let mut is_finished = vec![false; nb];
    let mut heuristic_unsatisfied = true;
    let mut cur_len = prompt_len;

    loop {
        let last: Vec<u32> = running.iter().map(|s| s[s.len() - 1]).collect();
        let logits = dec.step(&last)?;
        if logits.len() != nb {
            candle_core::bail!("decoder returned {} rows for {nb} beams", logits.len());
        }
        let vocab = logits[0].len();
        let mut acc = Vec::with_capacity(nb * vocab);
        for (b, row) in logits.iter().enumerate() {
            if row.len() != vocab {
                candle_core::bail!("ragged logits");
            }
            let mut lp_row = log_softmax(row);
            process_logits(&mut lp_row, &running[b], cfg, max_length);
            acc.extend(lp_row.iter().map(|&v| v + running_scores[b]));
        }

        // c. top-k continuations over all beams
        let top = top_k(&acc, k);
        if top.len() < k {
            candle_core::bail!("vocabulary too small for {nb} beams");
        }
        let cand_score: Vec<f32> = top.iter().map(|&i| acc[i]).collect();
        let cand_beam: Vec<usize> = top.iter().map(|&i| i / vocab).collect();
        let cand_seq: Vec<Vec<u32>> = top
            .iter()
            .zip(&cand_beam)
            .map(|(&i, &b)| {
                let mut s = running[b].clone();
                s.push((i % vocab) as u32);
                s
            })
            .collect();
        // d. which continuations finish
        let hits: Vec<bool> = cand_seq
            .iter()
            .map(|s| s[s.len() - 1] == cfg.eos_token_id || cur_len + 1 >= max_length)
            .collect();

        // e. best unfinished continuations carry on
        let run_scores: Vec<f32> = cand_score
            .iter()
            .zip(&hits)
            .map(|(&s, &h)| if h { s + NEG } else { s })
            .collect();
        let next = top_k(&run_scores, nb);
        let cache_idx: Vec<u32> = next.iter().map(|&i| cand_beam[i] as u32).collect();
        running = next.iter().map(|&i| cand_seq[i].clone()).collect();
        running_scores = next.iter().map(|&i| run_scores[i]).collect();

        // f. finished hypotheses
        let denom = ((cur_len + 1 - prompt_len) as f64).powf(lp) as f32;
        let full = early == EarlyStopping::True && is_finished.iter().all(|&f| f);
        let mut merged_scores = finished_scores.clone();
        let mut merged_fin = is_finished.clone();
        for i in 0..k {
            let mut s = cand_score[i] / denom;
            if full {
                s += NEG;
            }
            if !heuristic_unsatisfied {
                s += NEG;
            }
            let just_finished = hits[i] && i < nb;
            if !just_finished {
                s += NEG;
            }
            merged_scores.push(s);
            merged_fin.push(just_finished);
        }
        let keep = top_k(&merged_scores, nb);
        let mut new_finished = Vec::with_capacity(nb);
        for &i in &keep {
            new_finished.push(if i < nb {
                finished[i].clone()
            } else {
                cand_seq[i - nb].clone()
            });
        }
        finished = new_finished;
        finished_scores = keep.iter().map(|&i| merged_scores[i]).collect();
        is_finished = keep.iter().map(|&i| merged_fin[i]).collect();

        // g. next iteration
        dec.reorder(&cache_idx)?;
        cur_len += 1;
        let best_len = if early == EarlyStopping::Never && lp > 0.0 {
            max_length - prompt_len
        } else {
            cur_len - prompt_len
        };
        let best_possible = running_scores[0] / (best_len as f64).powf(lp) as f32;
        let worst_finished = finished_scores
            .iter()
            .copied()
            .fold(f32::INFINITY, f32::min);
        heuristic_unsatisfied = heuristic_unsatisfied
            && is_finished
                .iter()
                .any(|&f| best_possible > if f { worst_finished } else { NEG });
        let exists_open_beam = !(is_finished.iter().all(|&f| f) && early == EarlyStopping::True);
        let valid_continuations = !hits.iter().all(|&h| h);
        if !(heuristic_unsatisfied && exists_open_beam && valid_continuations) {
            break;
        }
    }
    Ok(finished.swap_remove(0))
}

/// Greedy when `num_beams == 1`, beam search otherwise.
pub fn generate<D: StepDecoder>(dec: &mut D, cfg: &GenerationConfig) -> Result<Vec<u32>> {
    if cfg.num_beams <= 1 {
        greedy(dec, cfg)
    } else {
        beam_search(dec, cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits from a fixed table indexed by the previous token.
    struct Markov {
        table: Vec<Vec<f32>>,
        steps: usize,
        rows: usize,
    }

    impl StepDecoder for Markov {
        fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
            self.steps += 1;
            self.rows = tokens.len();
            Ok(tokens
                .iter()
                .map(|&t| self.table[t as usize].clone())
                .collect())
        }
        fn reorder(&mut self, idx: &[u32]) -> Result<()> {
            assert_eq!(idx.len(), self.rows);
            Ok(())
        }
    }

    fn cfg(num_beams: usize, n: usize) -> GenerationConfig {
        GenerationConfig {
            num_beams,
            max_new_tokens: 12,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::True,
            no_repeat_ngram_size: n,
            forced_bos_token_id: Some(0),
            forced_eos_token_id: Some(2),
            eos_token_id: 2,
            pad_token_id: 1,
            decoder_start_token_id: 2,
        }
    }

    #[test]
    fn no_repeat_ngram_bans_the_completing_token() {
        let c = cfg(1, 3);
        let mut s = vec![0.0f32; 10];
        // 5 6 7 ... 5 6 -> 7 would repeat the trigram (5, 6, 7)
        process_logits(&mut s, &[2, 0, 5, 6, 7, 5, 6], &c, 100);
        assert_eq!(s[7], f32::NEG_INFINITY);
        assert_eq!(s.iter().filter(|v| v.is_infinite()).count(), 1);
        // too short for a trigram: nothing banned
        let mut s = vec![0.0f32; 10];
        process_logits(&mut s, &[5, 5], &c, 100);
        assert!(s.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn forced_tokens_at_first_and_last_step() {
        let c = cfg(1, 0);
        let mut s = vec![1.0f32; 5];
        process_logits(&mut s, &[2], &c, 10);
        assert_eq!(
            s,
            vec![
                0.0,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY
            ]
        );
        let mut s = vec![1.0f32; 5];
        process_logits(&mut s, &[2, 0, 4, 4, 4, 4, 4, 4, 4], &c, 10);
        assert_eq!(s[2], 0.0);
        assert_eq!(s.iter().filter(|v| v.is_infinite()).count(), 4);
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(
            top_k(&[1.0, 3.0, 3.0, f32::NEG_INFINITY, 2.0], 3),
            vec![1, 2, 4]
        );
        assert_eq!(top_k(&[f32::NEG_INFINITY; 4], 2), vec![0, 1]);
    }

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(&[1.0, 2.0, 3.0, f32::NEG_INFINITY]);
        let s: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(l[3], f32::NEG_INFINITY);
    }

    /// Tokens: 0 bos, 1 pad, 2 eos, 3..=5 words. After bos, greedy takes 3 (0.5) whose continuations
    /// are flat; 4 (0.4) leads to a near-certain 5 and then eos.
    fn trap_table() -> Vec<Vec<f32>> {
        let ln = |p: f32| p.ln();
        let flat = vec![-30.0, -30.0, ln(0.25), ln(0.25), ln(0.25), ln(0.25)];
        vec![
            vec![-30.0, -30.0, -30.0, ln(0.5), ln(0.4), ln(0.1)], // after bos
            flat.clone(),
            flat.clone(), // after eos / start
            flat.clone(), // after 3
            vec![-30.0, -30.0, ln(0.01), ln(0.01), ln(0.01), ln(0.97)], // after 4
            vec![-30.0, -30.0, ln(0.97), ln(0.01), ln(0.01), ln(0.01)], // after 5
        ]
    }

    #[test]
    fn beam_search_escapes_the_greedy_trap() {
        let mut m = Markov {
            table: trap_table(),
            steps: 0,
            rows: 0,
        };
        let g = greedy(&mut m, &cfg(1, 0)).unwrap();
        assert_eq!(&g[..3], &[2, 0, 3]);
        let mut m = Markov {
            table: trap_table(),
            steps: 0,
            rows: 0,
        };
        let b = beam_search(&mut m, &cfg(3, 0)).unwrap();
        assert_eq!(b, vec![2, 0, 4, 5, 2]);
        assert_eq!(m.rows, 3);
        // early stopping: it stops once 3 hypotheses are finished, well before max_new_tokens
        assert!(m.steps < 12, "{}", m.steps);
    }

    #[test]
    fn max_new_tokens_bounds_length_and_ends_with_forced_eos() {
        let flat = vec![vec![-30.0, -30.0, -5.0, 0.0, 0.0, 0.0]; 6];
        for beams in [1, 3] {
            let mut m = Markov {
                table: flat.clone(),
                steps: 0,
                rows: 0,
            };
            let mut c = cfg(beams, 0);
            c.max_new_tokens = 7;
            let out = generate(&mut m, &c).unwrap();
            assert_eq!(out.len(), 8, "{out:?}");
            assert_eq!(out[out.len() - 1], 2);
            assert_eq!(out[1], 0);
        }
        let mut m = Markov {
            table: flat,
            steps: 0,
            rows: 0,
        };
        let mut c = cfg(1, 0);
        c.max_new_tokens = 0;
        assert!(generate(&mut m, &c).is_err());
    }
}
