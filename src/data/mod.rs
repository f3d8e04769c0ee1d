//! The ground floor every stage stands on as a peer — `tasks`, `rollout`, `train` and `eval`:
//! sample records and their files ([`records`]), images read under the project's limits
//! ([`images`]), and the format sentence the prompts end with.

pub mod images;
pub mod records;

/// EasyR1's `math.jinja` format sentence, appended (after one space) to every RL prompt.
pub const FORMAT_SENTENCE: &str = "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}.";
