//! A lossless cache of prompt embeddings (T5 states + CLIP pooled output), keyed by the exact
//! token ids both encoders see and bounded by bytes.
//!
//! Captions and prompt templates repeat across jobs, and the text encoders (T5-XXL above all:
//! 4.7 B parameters, 24 layers over 512 tokens) cost the same for every repeat. The embeddings
//! are a pure function of the token ids (no attention mask, no randomness, weights fixed at
//! load), so an entry found under the same ids is exactly what a fresh encode would compute.
//! Keying by ids rather than by text makes prompts that tokenize alike (whitespace runs the
//! normalizers fold, text past the truncation length) share one entry.
//!
//! Entries live in host memory whatever device the encoders run on: a 16 GB card has no room to
//! spare, and a hit costs one host → device copy of the T5 states (8 MiB at 512 tokens, well
//! under a millisecond over PCIe 3), against tens of milliseconds for T5 on a T4. An entry's cost
//! is its tensors' bytes plus its key's; the least recently used entries go first when a new one
//! would pass the budget, and an entry larger than the whole budget is not kept.

use std::collections::VecDeque;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::text::PromptEmbeds;
use crate::error::Result;

/// Default budget: 32 prompts at T5's 512 tokens (512 × 4096 × 4 B = 8 MiB of f32 states each).
pub const DEFAULT_PROMPT_CACHE_BYTES: usize = 256 << 20;

/// Exact token ids of one prompt: CLIP's (77) and T5's (`max_sequence_length`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PromptKey {
    pub clip: Vec<u32>,
    pub t5: Vec<u32>,
}

impl PromptKey {
    fn bytes(&self) -> usize {
        (self.clip.len() + self.t5.len()) * std::mem::size_of::<u32>()
    }
}

/// What the cache did and holds, counted since load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptCacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries dropped to make room.
    pub evictions: u64,
    pub entries: usize,
    /// Bytes held (tensors and keys).
    pub bytes: usize,
    /// The most bytes it may hold.
    pub budget: usize,
}

struct Entry {
    key: PromptKey,
    embeds: Arc<PromptEmbeds>,
    bytes: usize,
}

/// Least recently used first out, bounded by bytes.
pub struct PromptCache {
    /// Most recently used first.
    entries: VecDeque<Entry>,
    stats: PromptCacheStats,
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl PromptCache {
    /// A cache of at most `budget` bytes (0: nothing is kept, every lookup misses).
    pub fn new(budget: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            stats: PromptCacheStats {
                budget,
                ..Default::default()
            },
        }
    }

    pub fn stats(&self) -> PromptCacheStats {
        self.stats
    }

    /// The embeddings stored under `key`, now the most recently used; counts a hit or a miss.
    pub fn get(&mut self, key: &PromptKey) -> Option<Arc<PromptEmbeds>> {
        match self.entries.iter().position(|e| e.key == *key) {
            Some(pos) => {
                let entry = self.entries.remove(pos)?;
                let embeds = entry.embeds.clone();
                self.entries.push_front(entry);
                self.stats.hits += 1;
                Some(embeds)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Stores host copies of `embeds` under `key`, evicting the least recently used entries
    /// as needed, and returns what is stored (the host copies), or `embeds` itself when it
    /// is not kept (larger than the budget). The copies are bit-exact.
    pub fn insert(
        &mut self,
        key: PromptKey,
        embeds: Arc<PromptEmbeds>,
    ) -> Result<Arc<PromptEmbeds>> {
        let bytes = tensor_bytes(&embeds.t5) + tensor_bytes(&embeds.pooled) + key.bytes();
        if bytes > self.stats.budget {
            return Ok(embeds);
        }
        if let Some(pos) = self.entries.iter().position(|e| e.key == key)
            && let Some(old) = self.entries.remove(pos)
        {
            self.stats.bytes -= old.bytes;
        }
        while self.stats.bytes + bytes > self.stats.budget {
            let Some(old) = self.entries.pop_back() else {
                break;
            };
            self.stats.bytes -= old.bytes;
            self.stats.evictions += 1;
        }
        let host = Arc::new(PromptEmbeds {
            t5: embeds.t5.to_device(&Device::Cpu)?,
            pooled: embeds.pooled.to_device(&Device::Cpu)?,
        });
        self.entries.push_front(Entry {
            key,
            embeds: host.clone(),
            bytes,
        });
        self.stats.bytes += bytes;
        self.stats.entries = self.entries.len();
        Ok(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn embeds(fill: f32, tokens: usize) -> Arc<PromptEmbeds> {
        Arc::new(PromptEmbeds {
            t5: Tensor::full(fill, (1, tokens, 4), &Device::Cpu).unwrap(),
            pooled: Tensor::full(fill, (1, 3), &Device::Cpu).unwrap(),
        })
    }

    fn key(id: u32, tokens: usize) -> PromptKey {
        PromptKey {
            clip: vec![id; 2],
            t5: vec![id; tokens],
        }
    }

    /// Bytes of one entry built by `embeds(_, tokens)` and `key(_, tokens)`.
    fn entry_bytes(tokens: usize) -> usize {
        (tokens * 4 + 3) * DType::F32.size_in_bytes() + (2 + tokens) * 4
    }

    #[test]
    fn a_hit_returns_the_stored_embeddings_and_counts() {
        let mut c = PromptCache::new(1 << 20);
        assert!(c.get(&key(1, 5)).is_none());
        let stored = c.insert(key(1, 5), embeds(0.5, 5)).unwrap();
        let hit = c.get(&key(1, 5)).expect("a hit");
        assert!(Arc::ptr_eq(&stored, &hit));
        assert!(c.get(&key(2, 5)).is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.entries, s.evictions), (1, 2, 1, 0));
        assert_eq!(s.bytes, entry_bytes(5));
    }

    #[test]
    fn the_least_recently_used_entry_goes_first_and_bytes_stay_in_budget() {
        let per = entry_bytes(5);
        let mut c = PromptCache::new(2 * per);
        c.insert(key(1, 5), embeds(1.0, 5)).unwrap();
        c.insert(key(2, 5), embeds(2.0, 5)).unwrap();
        // 1 is used again, so 2 is now the least recently used.
        assert!(c.get(&key(1, 5)).is_some());
        c.insert(key(3, 5), embeds(3.0, 5)).unwrap();
        let s = c.stats();
        assert_eq!((s.entries, s.evictions, s.bytes), (2, 1, 2 * per));
        assert!(c.get(&key(2, 5)).is_none());
        assert!(c.get(&key(1, 5)).is_some());
        assert!(c.get(&key(3, 5)).is_some());
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_kept() {
        let mut c = PromptCache::new(entry_bytes(5) - 1);
        let e = embeds(1.0, 5);
        let back = c.insert(key(1, 5), e.clone()).unwrap();
        assert!(Arc::ptr_eq(&back, &e));
        assert_eq!(c.stats().bytes, 0);
        assert!(c.get(&key(1, 5)).is_none());
        // A zero budget keeps nothing.
        let mut off = PromptCache::new(0);
        off.insert(key(1, 1), embeds(1.0, 1)).unwrap();
        assert_eq!(off.stats().entries, 0);
    }

    #[test]
    fn inserting_a_key_again_replaces_its_entry() {
        let mut c = PromptCache::new(1 << 20);
        c.insert(key(1, 5), embeds(1.0, 5)).unwrap();
        c.insert(key(1, 5), embeds(2.0, 5)).unwrap();
        let s = c.stats();
        assert_eq!((s.entries, s.bytes, s.evictions), (1, entry_bytes(5), 0));
        let v = c.get(&key(1, 5)).unwrap().pooled.to_vec2::<f32>().unwrap();
        assert_eq!(v[0][0], 2.0);
    }
}
