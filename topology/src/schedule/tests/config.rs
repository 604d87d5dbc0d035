//! Item enumeration of `ScheduleConfig`.

use super::cfg;
use crate::schedule::{Part, WorkItem};
use crate::TopologyError;

fn item(step: usize, part: Part) -> WorkItem {
    WorkItem { step, part }
}

#[test]
fn items_are_warmup_wholes_then_patches_in_step_order() {
    let c = cfg(2, 3, 2, 4);
    let p = Part::Patch;
    let expected = vec![
        item(0, Part::Whole),
        item(1, Part::Whole),
        item(2, p(0)),
        item(2, p(1)),
        item(2, p(2)),
        item(3, p(0)),
        item(3, p(1)),
        item(3, p(2)),
    ];
    assert_eq!(c.items(), expected);
    assert_eq!(c.item_count(), expected.len());
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "derived Ord is the global order");
    assert!(c.is_warmup(1) && !c.is_warmup(2));
    assert_eq!(c.parts(1), vec![Part::Whole]);
    assert_eq!(c.parts(3), vec![p(0), p(1), p(2)]);
    assert!(c.parts(4).is_empty());
}

#[test]
fn index_of_inverts_item_at() {
    for c in [
        cfg(1, 1, 0, 1),
        cfg(3, 4, 1, 5),
        cfg(2, 2, 9, 3),
        cfg(4, 3, 0, 6),
    ] {
        for (i, it) in c.items().into_iter().enumerate() {
            assert_eq!(c.item_at(i), Some(it));
            assert_eq!(c.index_of(it), Some(i));
        }
        assert_eq!(c.item_at(c.item_count()), None);
        assert_eq!(c.index_of(item(c.steps, Part::Whole)), None);
        assert_eq!(c.index_of(item(c.steps - 1, Part::Patch(c.patches))), None);
    }
}

#[test]
fn warmup_longer_than_steps_is_clamped() {
    let c = cfg(2, 4, 7, 3);
    assert_eq!(c.warmup_steps(), 3);
    assert!((0..3).all(|t| c.is_warmup(t)));
    assert_eq!(
        c.items(),
        (0..3).map(|t| item(t, Part::Whole)).collect::<Vec<_>>()
    );
}

#[test]
fn validate_rejects_zero_stages_patches_or_steps() {
    assert!(cfg(1, 1, 0, 1).validate().is_ok());
    for (c, field) in [
        (cfg(0, 1, 0, 1), "schedule.stages"),
        (cfg(1, 0, 0, 1), "schedule.patches"),
        (cfg(1, 1, 0, 0), "schedule.steps"),
    ] {
        match c.validate() {
            Err(TopologyError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{c:?}: expected Invalid for {field}, got {other:?}"),
        }
    }
}
