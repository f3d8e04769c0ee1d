//! Every prompt template, in one place, verbatim from the paper (App. A.7) and the official
//! `data_process/*.py`. Each problem carries one `<image>` placeholder per image, EasyR1's
//! convention. Deliberate departures from the published text:
//! - flip: the paper's "divided into 4 labeled" misses the word "patches"; we add it;
//! - shuffle with 3 strips: the paper prints "labeled 0, 1, 2, and 3" for both strip counts;
//!   we list the labels that exist ("0, 1, and 2");
//! - crop: the paper's `<image1>` … `<image5>` become five `<image>` placeholders.

/// EasyR1's placeholder for one image.
pub const IMAGE: &str = "<image>";

/// Labels `0..n` as English prose: "0, 1, and 2".
fn label_list(n: usize) -> String {
    let v: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    match v.len() {
        0 => String::new(),
        1 => v[0].clone(),
        2 => format!("{} and {}", v[0], v[1]),
        _ => format!("{}, and {}", v[..v.len() - 1].join(", "), v[v.len() - 1]),
    }
}

const CLUES: &str = "Based on visual clues such as continuity, alignment, and context,";

/// Shuffled patch reordering, 2×2 grid, with or without one white patch.
pub fn shuffle_grid(masked: bool) -> String {
    let mask = if masked {
        " One of the four patches is masked completely by white pixels."
    } else {
        ""
    };
    format!(
        "{IMAGE}The image has been divided into 4 shuffled patches labeled {}.{mask} {CLUES} answer the correct arrangement of the patches to restore the original image, where the format is 'TopLeft-TopRight-BottomLeft-BottomRight'.",
        label_list(4)
    )
}

/// Shuffled strips: `horizontal` strips lie side by side (1×N), vertical ones are stacked (N×1).
pub fn shuffle_strips(horizontal: bool, n: usize) -> String {
    let (kind, names): (&str, &[&str]) = match (horizontal, n) {
        (true, 3) => ("horizontal", &["Left", "Middle", "Right"]),
        (true, _) => ("horizontal", &["Left", "Middle1", "Middle2", "Right"]),
        (false, 3) => ("vertical", &["Top", "Middle", "Bottom"]),
        (false, _) => ("vertical", &["Top", "Middle1", "Middle2", "Bottom"]),
    };
    format!(
        "{IMAGE}The image has been divided into {n} shuffled {kind} strips labeled {}. {CLUES} answer the correct arrangement of the strips to restore the original image, where the format is '{}'.",
        label_list(n),
        names.join("-")
    )
}

/// Flipped patch recognition (2×2).
pub fn flip() -> String {
    format!(
        "{IMAGE}The image has been divided into 4 patches labeled {}. One of the four patches is flipped either horizontally or vertically. {CLUES} answer the correct patch that is flipped and the direction the flip, where the format is 'Label-Direction'. The direction can only be 0(flipped vertically) or 1(flipped horizontally).",
        label_list(4)
    )
}

/// Cropped patch inpainting: the blackened image, then the four options A–D.
pub fn crop() -> String {
    format!(
        "Which image is the missing part in the first image {IMAGE}? Based on visual clues such as alignment, image content, and positional relationship, select one of the four options {IMAGE}{IMAGE}{IMAGE}{IMAGE} as the final answer. The final answer should be chosen from 'A', 'B', 'C', and 'D'."
    )
}

/// Regional depth ordering.
pub fn depth_order() -> String {
    format!(
        "{IMAGE}The original image has three regions marked as 1, 2, and 3. Consider the content, positional relationships, depths of the three regions and other cues, and sort the depths of the three regions from smallest to largest from the camera, where the format of the answer is 'Smallest-Middle-Largest'."
    )
}

/// The four orientations of the hypothetical camera, in the official code's index order.
pub const FACING: [&str; 4] = [
    "it's facing to the left of the image",
    "it's facing to the right of the image",
    "it's facing to me",
    "it's facing to away from me",
];

/// Relative position (`Position.py`): `far` adds the "ignore the height difference" clause.
pub fn position(camera: u8, target: u8, facing: usize, options: &[String; 4], far: bool) -> String {
    let opts: String = options
        .iter()
        .zip(['A', 'B', 'C', 'D'])
        .map(|(o, l)| format!(" {l}. {o}"))
        .collect();
    let height = if far {
        " and ignore the height difference between the two regions"
    } else {
        ""
    };
    format!(
        "{IMAGE}I've taken an image and there are two regions marked as 1, and 2 on the image. Assume that there is a camera at position '{camera}' and {}. According to the camera, where is the region marker '{target}'?{opts}. Consider cues such as depth, orientation, and 3D spatial relationship{height}. The final answer should be chosen from 'A', 'B', 'C', and 'D'.",
        FACING[facing]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_the_paper() {
        assert_eq!(
            shuffle_grid(false),
            "<image>The image has been divided into 4 shuffled patches labeled 0, 1, 2, and 3. Based on visual clues such as continuity, alignment, and context, answer the correct arrangement of the patches to restore the original image, where the format is 'TopLeft-TopRight-BottomLeft-BottomRight'."
        );
        assert!(shuffle_grid(true).contains("labeled 0, 1, 2, and 3. One of the four patches is masked completely by white pixels. Based on"));
        assert!(
            shuffle_strips(true, 3).contains("3 shuffled horizontal strips labeled 0, 1, and 2.")
        );
        assert!(shuffle_strips(true, 4).ends_with("'Left-Middle1-Middle2-Right'."));
        assert!(shuffle_strips(false, 3).ends_with("'Top-Middle-Bottom'."));
        assert_eq!(crop().matches(IMAGE).count(), 5);
        let opts = ["Front", "Right", "Left", "Back"].map(String::from);
        assert_eq!(
            position(1, 2, 0, &opts, false),
            "<image>I've taken an image and there are two regions marked as 1, and 2 on the image. Assume that there is a camera at position '1' and it's facing to the left of the image. According to the camera, where is the region marker '2'? A. Front B. Right C. Left D. Back. Consider cues such as depth, orientation, and 3D spatial relationship. The final answer should be chosen from 'A', 'B', 'C', and 'D'."
        );
        assert!(position(2, 1, 3, &opts, true).contains("it's facing to away from me."));
        assert!(position(2, 1, 3, &opts, true).contains("3D spatial relationship and ignore the height difference between the two regions. The final"));
    }
}
