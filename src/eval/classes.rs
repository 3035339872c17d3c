//! Class names shared by VOC and COCO, so a VOC-class detector can be scored on COCO images.

/// The 20 PASCAL VOC classes in the devkit's (alphabetical) order.
pub const VOC_CLASSES: [&str; 20] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// VOC names that COCO spells differently; every other VOC class has the same name in COCO.
const VOC_TO_COCO: [(&str, &str); 6] = [
    ("aeroplane", "airplane"),
    ("motorbike", "motorcycle"),
    ("sofa", "couch"),
    ("tvmonitor", "tv"),
    ("diningtable", "dining table"),
    ("pottedplant", "potted plant"),
];

/// The COCO name of a VOC class; any other name (a COCO name included) is returned unchanged, so
/// the function can be applied to a detector's labels whatever dataset it was trained on.
pub fn voc_to_coco_name(name: &str) -> &str {
    VOC_TO_COCO
        .iter()
        .find(|(voc, _)| *voc == name)
        .map_or(name, |(_, coco)| coco)
}

/// The VOC name of a COCO class; names without a VOC spelling are returned unchanged.
pub fn coco_to_voc_name(name: &str) -> &str {
    VOC_TO_COCO
        .iter()
        .find(|(_, coco)| *coco == name)
        .map_or(name, |(voc, _)| voc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_round_trips_and_is_identity_elsewhere() {
        assert_eq!(voc_to_coco_name("aeroplane"), "airplane");
        assert_eq!(voc_to_coco_name("tvmonitor"), "tv");
        assert_eq!(voc_to_coco_name("diningtable"), "dining table");
        assert_eq!(voc_to_coco_name("person"), "person");
        assert_eq!(voc_to_coco_name("airplane"), "airplane");
        for voc in VOC_CLASSES {
            assert_eq!(coco_to_voc_name(voc_to_coco_name(voc)), voc);
        }
        assert_eq!(coco_to_voc_name("couch"), "sofa");
        assert_eq!(coco_to_voc_name("truck"), "truck");
    }
}
