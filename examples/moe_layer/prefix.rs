//! Prefix sharing of KV blocks.
//!
//! A sequence's KV cache is split into blocks of [`KV_BLOCK_TOKENS`] tokens,
//! and a block table maps the sequence's block index to a block id. Two
//! sequences may point at the same block when the block's tokens are equal
//! in both. The trace identifies tokens by hash ids, so the tokens of a block
//! are fixed by the chain of hash ids from the start of the prompt up to
//! the hash block that contains the block's last token. [`PrefixBlockTable`] maps such
//! a chain, plus the block's index, to a shared block and counts its users.
//!
//! Only blocks that the prompt fills completely are shared. The block
//! holding the end of the prompt and the blocks that decode steps append to
//! are private to their sequence, because a sequence writes into them after
//! the prompt.

use std::collections::HashMap;

use crate::trace::{Scale, Sequence};

/// Tokens per KV block.
pub const KV_BLOCK_TOKENS: usize = 16;

/// A KV block of the plan, dense from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Parent of the first hash id of every chain.
const ROOT: u32 = u32::MAX;

/// A trie of hash-id chains. Each node stands for one chain from the start
/// of a prompt, so equal node ids mean equal prefixes.
#[derive(Debug, Default)]
struct ChainTrie {
    children: HashMap<(u32, u64), u32>,
}

impl ChainTrie {
    /// Returns the node of every prefix of `hash_ids`, inserting missing
    /// ones: element `i` stands for `hash_ids[..=i]`.
    fn walk(&mut self, hash_ids: &[u64]) -> Vec<u32> {
        let mut parent = ROOT;
        let mut path = Vec::with_capacity(hash_ids.len());
        for &id in hash_ids {
            let next = self.children.len() as u32;
            parent = *self.children.entry((parent, id)).or_insert(next);
            path.push(parent);
        }
        path
    }
}

/// Returns, for each chain, the length of the longest prefix it shares with
/// at least one other chain.
pub fn shared_prefix_depths(chains: &[&[u64]]) -> Vec<usize> {
    let mut trie = ChainTrie::default();
    let paths: Vec<Vec<u32>> = chains.iter().map(|chain| trie.walk(chain)).collect();

    let mut users = vec![0u32; trie.children.len()];
    for path in &paths {
        for &node in path {
            users[node as usize] += 1;
        }
    }

    // Users only shrink along a path, so the shared part is a leading run.
    paths
        .iter()
        .map(|path| path.iter().take_while(|&&node| users[node as usize] >= 2).count())
        .collect()
}

/// A block handed out by [`PrefixBlockTable::acquire_prompt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acquired {
    pub id: BlockId,
    /// True when this call created the block, so the caller must write its
    /// keys and values; false when another sequence already holds it.
    pub fresh: bool,
}

/// Reference-counted KV blocks, keyed by the hash-id chain that fixes their
/// tokens.
#[derive(Debug, Default)]
pub struct PrefixBlockTable {
    trie: ChainTrie,
    /// (trie node of the chain up to the block's last token, block index).
    shared: HashMap<(u32, u32), BlockId>,
    /// Users of each block; 0 once released.
    ref_counts: Vec<u32>,
    /// The `shared` key of each block, `None` for private blocks.
    keys: Vec<Option<(u32, u32)>>,
}

impl PrefixBlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the blocks that a prompt of `prompt_tokens` tokens fills
    /// completely, with `hash_block_tokens` tokens per hash id. A block
    /// already held for the same chain is reused and its count raised.
    pub fn acquire_prompt(
        &mut self,
        hash_ids: &[u64],
        prompt_tokens: usize,
        hash_block_tokens: usize,
    ) -> Vec<Acquired> {
        let path = self.trie.walk(hash_ids);
        let full_blocks = prompt_tokens / KV_BLOCK_TOKENS;
        let mut acquired = Vec::with_capacity(full_blocks);

        for block in 0..full_blocks {
            let last_token = (block + 1) * KV_BLOCK_TOKENS - 1;
            let key = (path[last_token / hash_block_tokens], block as u32);
            match self.shared.get(&key) {
                Some(&id) => {
                    self.ref_counts[id.index()] += 1;
                    acquired.push(Acquired { id, fresh: false });
                }
                None => {
                    let id = self.new_block(Some(key));
                    self.shared.insert(key, id);
                    acquired.push(Acquired { id, fresh: true });
                }
            }
        }
        acquired
    }

    /// Returns a new block that no other sequence will share.
    pub fn allocate_private(&mut self) -> BlockId {
        self.new_block(None)
    }

    fn new_block(&mut self, key: Option<(u32, u32)>) -> BlockId {
        let id = BlockId(self.ref_counts.len() as u32);
        self.ref_counts.push(1);
        self.keys.push(key);
        id
    }

    #[cfg_attr(not(test), allow(dead_code))] // The distributed run counts users in pool memory instead.
    /// Drops one reference to each of `blocks` and returns those no one
    /// holds any more, which the caller may free. A block released more
    /// often than acquired is left at 0 and not returned again.
    pub fn release(&mut self, blocks: &[BlockId]) -> Vec<BlockId> {
        let mut freed = Vec::new();
        for &id in blocks {
            let Some(count) = self.ref_counts.get_mut(id.index()) else { continue };
            if *count == 0 {
                continue;
            }
            *count -= 1;
            if *count == 0 {
                if let Some(key) = self.keys[id.index()] {
                    self.shared.remove(&key);
                }
                freed.push(id);
            }
        }
        freed
    }

    /// Users of `id`; 0 for a released or unknown block.
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.ref_counts.get(id.index()).copied().unwrap_or(0)
    }

    /// Blocks ever created; ids are below this.
    pub fn blocks_created(&self) -> usize {
        self.ref_counts.len()
    }

    #[cfg_attr(not(test), allow(dead_code))] // The distributed run counts users in pool memory instead.
    /// Blocks with at least one user.
    pub fn live_blocks(&self) -> usize {
        self.ref_counts.iter().filter(|&&c| c > 0).count()
    }
}

/// One sequence's share of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceBlocks {
    /// Block ids by block index, enough for the prompt and every decode
    /// step.
    pub table: Vec<BlockId>,
    /// Blocks at the start of `table` that the prompt fills; the rest are
    /// private.
    pub prompt_full_blocks: usize,
    /// Of those, blocks that an earlier sequence of the batch created.
    pub reused_blocks: usize,
}

impl SequenceBlocks {
    /// Returns the block and the slot inside it of token `position`.
    pub fn locate(&self, position: usize) -> (BlockId, usize) {
        (self.table[position / KV_BLOCK_TOKENS], position % KV_BLOCK_TOKENS)
    }
}

/// The KV blocks of a whole batch, with or without prefix sharing.
#[derive(Debug)]
pub struct SharingPlan {
    pub sequences: Vec<SequenceBlocks>,
    /// The sequence that writes each block's keys and values, by block id.
    pub writer: Vec<usize>,
    /// Users of each block, by block id.
    pub ref_counts: Vec<u32>,
    /// Blocks the batch would need if no block were shared.
    pub unshared_blocks: usize,
}

impl SharingPlan {
    /// Plans the blocks of `sequences` for their prompts and `steps` decode
    /// tokens each. With `share` false every block is private, which is the
    /// baseline that sharing is measured against.
    pub fn build(sequences: &[Sequence], scale: Scale, steps: usize, share: bool) -> Self {
        let mut table = PrefixBlockTable::new();
        let mut writer = Vec::new();
        let mut planned = Vec::with_capacity(sequences.len());
        let mut unshared_blocks = 0;

        for (index, seq) in sequences.iter().enumerate() {
            let total_blocks = (seq.prompt_tokens + steps).div_ceil(KV_BLOCK_TOKENS);
            unshared_blocks += total_blocks;

            let prompt = if share {
                table.acquire_prompt(&seq.hash_ids, seq.prompt_tokens, scale.hash_block_tokens())
            } else {
                Vec::new()
            };
            let prompt_full_blocks = seq.prompt_tokens / KV_BLOCK_TOKENS;
            let reused_blocks = prompt.iter().filter(|a| !a.fresh).count();

            let mut ids = Vec::with_capacity(total_blocks);
            for acquired in prompt {
                if acquired.fresh {
                    writer.push(index);
                }
                ids.push(acquired.id);
            }
            while ids.len() < total_blocks {
                ids.push(table.allocate_private());
                writer.push(index);
            }
            planned.push(SequenceBlocks { table: ids, prompt_full_blocks, reused_blocks });
        }

        let ref_counts =
            (0..table.blocks_created()).map(|i| table.ref_count(BlockId(i as u32))).collect();
        SharingPlan { sequences: planned, writer, ref_counts, unshared_blocks }
    }

    /// Blocks the plan allocates.
    pub fn blocks(&self) -> usize {
        self.writer.len()
    }

    /// Blocks saved by sharing compared with giving every sequence its own.
    pub fn saved_blocks(&self) -> usize {
        self.unshared_blocks - self.blocks()
    }

    /// Blocks used by more than one sequence.
    pub fn shared_blocks(&self) -> usize {
        self.ref_counts.iter().filter(|&&c| c > 1).count()
    }

    /// Returns whether sequence `seq` writes the keys and values of `block`.
    pub fn writes(&self, seq: usize, block: BlockId) -> bool {
        self.writer[block.index()] == seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(prompt_tokens: usize, hash_ids: &[u64]) -> Sequence {
        Sequence { line: 0, prompt_tokens, output_tokens: 0, hash_ids: hash_ids.to_vec() }
    }

    /// Scale 32: one hash id covers 16 tokens, exactly one KV block.
    fn scale32() -> Scale {
        Scale::new(32).unwrap()
    }

    #[test]
    fn depths_of_hand_made_chains() {
        let chains: [&[u64]; 4] = [&[0, 1, 2], &[0, 1, 3], &[0, 4], &[5]];
        assert_eq!(shared_prefix_depths(&chains), vec![2, 2, 1, 0]);
    }

    #[test]
    fn depth_of_identical_chains_is_full() {
        let chains: [&[u64]; 2] = [&[3, 4, 5], &[3, 4, 5]];
        assert_eq!(shared_prefix_depths(&chains), vec![3, 3]);
    }

    #[test]
    fn table_shares_common_prefix_blocks() {
        let mut table = PrefixBlockTable::new();
        let a = table.acquire_prompt(&[0, 1, 2], 48, 16);
        let b = table.acquire_prompt(&[0, 1, 9], 48, 16);
        assert_eq!(a.iter().filter(|x| x.fresh).count(), 3);
        assert_eq!(b[0], Acquired { id: a[0].id, fresh: false });
        assert_eq!(b[1], Acquired { id: a[1].id, fresh: false });
        assert!(b[2].fresh);
        assert_eq!(table.ref_count(a[0].id), 2);
        assert_eq!(table.ref_count(a[2].id), 1);
    }

    #[test]
    fn table_needs_equal_chain_not_equal_id() {
        // Hash id 1 at the same position, but after different first ids,
        // is different content.
        let mut table = PrefixBlockTable::new();
        let a = table.acquire_prompt(&[0, 1], 32, 16);
        let b = table.acquire_prompt(&[7, 1], 32, 16);
        assert!(b.iter().all(|x| x.fresh));
        assert_ne!(a[1].id, b[1].id);
    }

    #[test]
    fn table_skips_partial_block() {
        let mut table = PrefixBlockTable::new();
        assert_eq!(table.acquire_prompt(&[0, 1], 31, 16).len(), 1);
    }

    #[test]
    fn table_with_small_hash_blocks() {
        // Four tokens per hash id: block 0 is fixed by ids [0..4].
        let mut table = PrefixBlockTable::new();
        let a = table.acquire_prompt(&[1, 2, 3, 4, 5, 6, 7, 8], 32, 4);
        let b = table.acquire_prompt(&[1, 2, 3, 4, 5, 6, 7, 9], 32, 4);
        let c = table.acquire_prompt(&[1, 2, 3, 9, 5, 6, 7, 8], 32, 4);
        assert_eq!(b[0].id, a[0].id);
        assert!(b[1].fresh);
        assert!(c[0].fresh);
    }

    #[test]
    fn release_frees_after_last_user() {
        let mut table = PrefixBlockTable::new();
        let a: Vec<BlockId> = table.acquire_prompt(&[0, 1], 32, 16).iter().map(|x| x.id).collect();
        let b: Vec<BlockId> = table.acquire_prompt(&[0, 2], 32, 16).iter().map(|x| x.id).collect();
        assert_eq!(table.live_blocks(), 3);

        assert_eq!(table.release(&a), vec![a[1]]);
        assert_eq!(table.ref_count(a[0]), 1);
        assert_eq!(table.release(&b), vec![b[0], b[1]]);
        assert_eq!(table.live_blocks(), 0);
        assert!(table.release(&b).is_empty());

        // A released chain is no longer found: the next user writes it anew.
        let c = table.acquire_prompt(&[0, 1], 32, 16);
        assert!(c.iter().all(|x| x.fresh));
    }

    #[test]
    fn plan_counts_savings() {
        // Prompts of 40, 40 and 20 tokens, 2 decode steps each.
        let seqs = [
            sequence(40, &[0, 1, 2]),
            sequence(40, &[0, 1, 3]),
            sequence(20, &[5, 6]),
        ];
        let shared = SharingPlan::build(&seqs, scale32(), 2, true);
        let unshared = SharingPlan::build(&seqs, scale32(), 2, false);

        // ceil(42 / 16) + ceil(42 / 16) + ceil(22 / 16) = 3 + 3 + 2.
        assert_eq!(unshared.unshared_blocks, 8);
        assert_eq!(unshared.blocks(), 8);
        assert_eq!(unshared.saved_blocks(), 0);

        // The second sequence reuses both full prompt blocks of the first.
        assert_eq!(shared.blocks(), 6);
        assert_eq!(shared.saved_blocks(), 2);
        assert_eq!(shared.shared_blocks(), 2);
        assert_eq!(shared.sequences[1].reused_blocks, 2);
        assert_eq!(shared.sequences[1].table[..2], shared.sequences[0].table[..2]);
        assert_ne!(shared.sequences[1].table[2], shared.sequences[0].table[2]);
        assert!(shared.writes(0, shared.sequences[1].table[0]));
        assert!(!shared.writes(1, shared.sequences[1].table[0]));
    }

    #[test]
    fn plan_tables_cover_decode() {
        let seqs = [sequence(16, &[0])];
        let plan = SharingPlan::build(&seqs, scale32(), 1, true);
        // 17 tokens need two blocks; the second is private.
        assert_eq!(plan.sequences[0].table.len(), 2);
        assert_eq!(plan.sequences[0].locate(16), (plan.sequences[0].table[1], 0));
    }
}
