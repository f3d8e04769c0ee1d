//! How a batch's work is shared out: the CPU slices' prompt shares (dealt by estimated cost),
//! the vision calls' deal, the prefill's groups of near-equal length, and the slices' results
//! joined back in prompt order.

use super::types::Completion;

/// The completions of the slices' shares as one list in prompt order, prompt indices counted
/// over all the prompts.
pub(super) fn joined(parts: Vec<Vec<Completion>>, shares: &[Vec<usize>]) -> Vec<Completion> {
    let mut all: Vec<Completion> = parts
        .into_iter()
        .zip(shares)
        .flat_map(|(part, share)| {
            part.into_iter().map(move |mut c| {
                c.prompt_index = share[c.prompt_index];
                c
            })
        })
        .collect();
    // Stable: a prompt's samples stay in order.
    all.sort_by_key(|c| c.prompt_index);
    all
}

/// Deals the items, with their estimated costs, into `k` shares: the costliest first, each to
/// the share whose cost so far is least (ties to the lower index). Each share lists its item
/// indices in ascending order.
pub(super) fn deal(costs: &[usize], k: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(costs[i]));
    let mut shares = vec![Vec::new(); k];
    let mut load = vec![0usize; k];
    for i in order {
        let s = (0..k).min_by_key(|&s| load[s]).expect("at least one share");
        shares[s].push(i);
        load[s] += costs[i];
    }
    for share in &mut shares {
        share.sort_unstable();
    }
    shares
}

/// What a prompt costs a CPU slice, estimated: its tokens (images included) and the image
/// tokens its slice still has to run the vision tower for (0 when they ran before).
#[derive(Debug, Clone, Copy)]
pub(super) struct PromptCost {
    pub(super) tokens: usize,
    pub(super) vision: usize,
}

/// A slice's estimated cost, in tokens: the image tokens its vision calls run, the prompts'
/// tokens its prefill runs (in groups of near-equal length, `Runner::prefill_apart`), and
/// its prompts padded to the longest, which every decode step reads (each row's prompt cache).
#[derive(Debug, Clone, Copy, PartialEq)]
struct ShareCost {
    /// Vision and prompt tokens of the share.
    own: usize,
    prompts: usize,
    /// The longest prompt's tokens and the second longest's (0 when none).
    longest: [usize; 2],
}

impl ShareCost {
    fn of(costs: &[PromptCost], share: &[usize]) -> ShareCost {
        let mut c = ShareCost {
            own: 0,
            prompts: share.len(),
            longest: [0, 0],
        };
        for &i in share {
            c.own += costs[i].vision + costs[i].tokens;
            let n = costs[i].tokens;
            if n > c.longest[0] {
                c.longest = [n, c.longest[0]];
            } else if n > c.longest[1] {
                c.longest[1] = n;
            }
        }
        c
    }

    fn total(&self) -> usize {
        self.own + self.prompts * self.longest[0]
    }

    /// The total once prompt `out` leaves for prompt `into`.
    fn swapped(&self, out: PromptCost, into: PromptCost) -> usize {
        let rest = match out.tokens == self.longest[0] {
            true => self.longest[1],
            false => self.longest[0],
        };
        let own = self.own - out.vision - out.tokens + into.vision + into.tokens;
        own + self.prompts * rest.max(into.tokens)
    }
}

/// The prompts dealt into `k` shares for the CPU slices. Every share gets the same number of
/// prompts give or take one (the slices decode the same number of rows). It starts from the
/// prompts sorted by length, cut into consecutive shares (the least padding), then swaps
/// prompts out of the costliest share ([`ShareCost`]) while a swap lowers it below what it
/// was, so that a slice given the prompts with many images does not keep the others waiting.
/// Each share lists its prompt indices in ascending order.
pub(super) fn prompt_shares(costs: &[PromptCost], k: usize) -> Vec<Vec<usize>> {
    let n = costs.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(costs[i].tokens));
    let mut shares: Vec<Vec<usize>> = (0..k)
        .map(|s| order[s * n / k..(s + 1) * n / k].to_vec())
        .collect();
    // Every swap taken lowers the costliest share's cost or the number of shares at that cost,
    // so this ends; the bound caps the work on very large batches.
    for _ in 0..4 * n {
        let cost: Vec<ShareCost> = shares.iter().map(|s| ShareCost::of(costs, s)).collect();
        let worst = (0..k)
            .max_by_key(|&s| (cost[s].total(), std::cmp::Reverse(s)))
            .unwrap_or(0);
        let mut best: Option<(usize, usize, usize, usize)> = None;
        for other in (0..k).filter(|&s| s != worst) {
            for (a, &x) in shares[worst].iter().enumerate() {
                for (b, &y) in shares[other].iter().enumerate() {
                    let after = cost[worst]
                        .swapped(costs[x], costs[y])
                        .max(cost[other].swapped(costs[y], costs[x]));
                    if after < cost[worst].total() && best.is_none_or(|(c, ..)| after < c) {
                        best = Some((after, other, a, b));
                    }
                }
            }
        }
        let Some((_, other, a, b)) = best else { break };
        let (x, y) = (shares[worst][a], shares[other][b]);
        shares[worst][a] = y;
        shares[other][b] = x;
    }
    for share in &mut shares {
        share.sort_unstable();
    }
    shares
}

/// The prompts (indices into `lengths`) of each prefill call: longest first, a prompt joins the
/// group in hand while padding it to the group's longest keeps the group's padding within an
/// eighth of its tokens, else it starts the next group. Prompts of nearly one length share a
/// call; a one-image prompt does not pad to a five-image one.
pub(super) fn length_groups(lengths: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let (mut width, mut tokens) = (0, 0);
    for i in order {
        let n = lengths[i];
        match groups.last_mut() {
            Some(g) if 8 * (g.len() + 1) * width <= 9 * (tokens + n) => {
                g.push(i);
                tokens += n;
            }
            _ => {
                groups.push(vec![i]);
                (width, tokens) = (n, n);
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Finish;

    fn prompt(tokens: usize, vision: usize) -> PromptCost {
        PromptCost { tokens, vision }
    }

    /// Two prompts of two images among six of one: each slice gets one of the long ones and
    /// the same number of prompts, and every prompt is dealt once.
    #[test]
    fn prompt_shares_spread_the_long_prompts() {
        let (long, short) = (prompt(720, 648), prompt(400, 324));
        let costs = [short, short, long, short, short, long, short, short];
        let shares = prompt_shares(&costs, 2);
        assert_eq!(shares.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4]);
        for share in &shares {
            assert!(share.is_sorted());
            let longs = share.iter().filter(|&&i| costs[i].tokens == 720).count();
            assert_eq!(longs, 1, "{shares:?}");
        }
        let mut all: Vec<usize> = shares.concat();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        // Prompts alike: consecutive shares, sizes within one.
        let alike = prompt_shares(&[short; 7], 3);
        assert_eq!(alike, [vec![0, 1], vec![2, 3], vec![4, 5, 6]]);
        // Fewer prompts than shares: an empty share, never a lost prompt.
        assert_eq!(prompt_shares(&[long], 2), [vec![], vec![0]]);
    }

    /// The cost after a swap, worked out from the share's totals and two longest prompts, is
    /// the cost of the share with the prompt swapped.
    #[test]
    fn share_cost_after_a_swap_is_the_swapped_share_cost() {
        let costs: Vec<PromptCost> = (0..9)
            .map(|i| prompt([400, 720, 391, 720, 88, 5, 400, 1000, 3][i], (i * 37) % 300))
            .collect();
        let share = [0, 1, 3, 4, 6];
        let c = ShareCost::of(&costs, &share);
        assert_eq!(
            c.total(),
            2 * 400 + 2 * 720 + 88 + (37 + 111 + 148 + 222) + 5 * 720
        );
        for (pos, &out) in share.iter().enumerate() {
            for into in [2, 5, 7, 8] {
                let mut after = share.to_vec();
                after[pos] = into;
                assert_eq!(
                    c.swapped(costs[out], costs[into]),
                    ShareCost::of(&costs, &after).total(),
                    "{out} for {into}"
                );
            }
        }
    }

    /// Prompts within an eighth of padding share a prefill call; a two-image prompt does not
    /// pad the one-image ones.
    #[test]
    fn length_groups_keep_padding_within_an_eighth() {
        let lengths = [391, 394, 422, 422, 720, 720, 400, 391];
        assert_eq!(
            length_groups(&lengths),
            [vec![4, 5], vec![2, 3, 6, 1, 0, 7]]
        );
        assert_eq!(length_groups(&[50, 50, 50]), [vec![0, 1, 2]]);
        assert_eq!(length_groups(&[100, 3000]), [vec![1], vec![0]]);
        assert!(length_groups(&[]).is_empty());
        let lengths = [9, 400, 17, 350, 380, 1, 2000, 1900];
        for group in length_groups(&lengths) {
            let w = group.iter().map(|&i| lengths[i]).max().unwrap();
            let tokens: usize = group.iter().map(|&i| lengths[i]).sum();
            assert!(8 * group.len() * w <= 9 * tokens, "{group:?}");
        }
    }

    /// Items dealt heaviest first to the lightest share, any number to a share.
    #[test]
    fn deal_balances_the_heaviest_first() {
        // 5 → a; 4 → b; 3 → b (7); 2 → a (7); 1 → a (ties to the first share).
        assert_eq!(deal(&[5, 1, 4, 2, 3], 2), [vec![0, 1, 3], vec![2, 4]]);
        // 9 → a; each 1 → b, the lighter share throughout.
        assert_eq!(deal(&[9, 1, 1, 1], 2), [vec![0], vec![1, 2, 3]]);
    }

    /// The slices' completions come back in prompt order, each numbered by its prompt over the
    /// whole call, a prompt's samples in order.
    #[test]
    fn joined_puts_the_shares_back_in_prompt_order() {
        let c = |prompt_index, sample_index| Completion {
            prompt_index,
            sample_index,
            tokens: vec![],
            logprobs: vec![],
            finish: Finish::Length,
        };
        let parts = vec![
            vec![c(0, 0), c(0, 1), c(1, 0), c(1, 1)],
            vec![c(0, 0), c(0, 1), c(1, 0), c(1, 1)],
        ];
        let all = joined(parts, &[vec![1, 3], vec![0, 2]]);
        let order: Vec<(usize, usize)> = all
            .iter()
            .map(|c| (c.prompt_index, c.sample_index))
            .collect();
        assert_eq!(
            order,
            [
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (2, 0),
                (2, 1),
                (3, 0),
                (3, 1)
            ]
        );
    }
}
