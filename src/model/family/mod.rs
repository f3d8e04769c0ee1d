//! Model families: what the runtime knows of a family beyond what its package's manifest and
//! configs say. The manifest names the family (`family`, Qwen2.5-VL's when absent); the sizes,
//! token ids, graph contract and DeepStack depth come from the manifest itself, so a family
//! here is its names, its prompt's image placeholder and how its M-RoPE configuration is read.
//!
//! Adding a family: its exporter module (`models/ssrl_export/<family>.py`, which writes the
//! manifest's `family`), a file here with its [`FamilySpec`], and its line in [`FAMILIES`].

pub mod qwen2_5_vl;
pub mod qwen3_vl;

use super::package::Manifest;
use super::rope::RopeConfig;

/// One family's specifics.
#[derive(Debug)]
pub struct FamilySpec {
    /// The name in manifests and genai_config.json (`qwen2_5_vl`).
    pub id: &'static str,
    /// The name for people (`Qwen2.5-VL`).
    pub name: &'static str,
    /// The chat template's image placeholder, which a prompt repeats once per image token.
    pub image_pad: &'static str,
    /// The host-side M-RoPE settings for [`rope_index`](super::rope::rope_index).
    pub rope: fn(&Manifest) -> RopeConfig,
}

/// Every family the runtime knows; the first is the default of manifests without `family`.
pub const FAMILIES: &[&FamilySpec] = &[&qwen2_5_vl::SPEC, &qwen3_vl::SPEC];

/// The M-RoPE of the Qwen-VL families: image and video token ids from the model's config, the
/// vision tower's merge size, and the temporal scale of video positions.
pub(crate) fn qwen_mrope(m: &Manifest) -> RopeConfig {
    RopeConfig {
        image_token_id: m.tokens.image,
        video_token_id: m.tokens.video,
        spatial_merge_size: m.vision.spatial_merge_size,
        tokens_per_second: m.vision.tokens_per_second,
    }
}

/// A package's family (one of [`FAMILIES`]).
#[derive(Clone, Copy)]
pub struct Family(&'static FamilySpec);

impl Family {
    pub const QWEN2_5_VL: Family = Family(&qwen2_5_vl::SPEC);
    pub const QWEN3_VL: Family = Family(&qwen3_vl::SPEC);

    /// The family a manifest names, if the runtime knows it.
    pub fn by_id(id: &str) -> Option<Family> {
        FAMILIES.iter().find(|f| f.id == id).map(|f| Family(f))
    }

    /// The name in manifests (`qwen2_5_vl`).
    pub fn id(self) -> &'static str {
        self.0.id
    }

    /// The name for people (`Qwen2.5-VL`).
    pub fn name(self) -> &'static str {
        self.0.name
    }

    pub fn spec(self) -> &'static FamilySpec {
        self.0
    }

    /// The M-RoPE settings of a package of this family.
    pub fn rope(self, m: &Manifest) -> RopeConfig {
        (self.0.rope)(m)
    }
}

impl Default for Family {
    fn default() -> Self {
        Family(FAMILIES[0])
    }
}

impl PartialEq for Family {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for Family {}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.id)
    }
}

impl<'de> serde::Deserialize<'de> for Family {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let id = String::deserialize(d)?;
        Family::by_id(&id).ok_or_else(|| {
            let known: Vec<&str> = FAMILIES.iter().map(|f| f.id).collect();
            serde::de::Error::custom(format!(
                "unknown model family `{id}` (this build knows {})",
                known.join(", ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_found_by_their_manifest_names_and_unknown_ones_are_named() {
        for f in FAMILIES {
            let parsed: Family = serde_json::from_value(serde_json::json!(f.id)).unwrap();
            assert_eq!(parsed.id(), f.id);
        }
        assert_eq!(
            FAMILIES
                .iter()
                .map(|f| f.id)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            FAMILIES.len()
        );
        assert_eq!(Family::default(), Family::QWEN2_5_VL);
        let e = serde_json::from_value::<Family>(serde_json::json!("llava_next"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("llava_next") && e.contains("qwen2_5_vl") && e.contains("qwen3_vl"),
            "{e}"
        );
    }
}
