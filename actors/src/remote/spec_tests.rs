//! Request payloads: round trips (DiT labels, PixArt captions with masks), and bad bytes refused
//! naming the field, never a panic.

use super::*;

fn pixart() -> ModelConfig {
    ModelConfig {
        caption_channels: 6,
        ..ModelConfig::preset("PixArt-alpha-256").unwrap()
    }
}

/// A guided PixArt request with every caption tensor, 2 stages, 2 patches.
fn setup(cfg: &ModelConfig) -> (RequestSetup, ScheduleConfig) {
    let caption = Caption {
        embeds: model::gaussian(&[1, 3, 6], 1),
        mask: Some(Tensor::from_vec(vec![1.0, 1.0, 0.0], &[1, 3]).unwrap()),
        negative: Some((model::gaussian(&[1, 3, 6], 2), None)),
        pooled: None,
        negative_pooled: None,
    };
    let request = Request {
        class_labels: vec![],
        caption: Some(caption),
        guidance_scale: 4.5,
        latent_size: [8, 8],
        embedded_guidance: None,
    };
    let scheduler = model::sampler::Scheduler::named("dpm").unwrap();
    let noise = model::gaussian(&[1, 4, 8, 8], 3);
    let setup =
        RequestSetup::new(7, cfg, &request, &scheduler, 5, &noise, vec![0..2, 2..4], 1).unwrap();
    let schedule = ScheduleConfig {
        stages: 2,
        patches: 2,
        warmup: 1,
        steps: 5,
    };
    (setup, schedule)
}

#[test]
fn a_request_round_trips_exactly() {
    let cfg = pixart();
    let (want, schedule) = setup(&cfg);
    let bytes = encode_request(&want, &schedule).unwrap();
    let (got, got_schedule) = decode_request(&cfg, 7, &bytes).unwrap();
    assert_eq!(got_schedule, schedule);
    assert_eq!(got.sampling, want.sampling);
    assert_eq!(got.patches, want.patches);
    assert_eq!(got.warmup, want.warmup);
    assert_eq!(
        got.initial_latent.as_f32().unwrap(),
        want.initial_latent.as_f32().unwrap()
    );
    let (a, b) = (
        got.request.caption.clone().unwrap(),
        want.request.caption.unwrap(),
    );
    assert_eq!(a.embeds.as_f32().unwrap(), b.embeds.as_f32().unwrap());
    assert_eq!(
        a.mask.unwrap().as_f32().unwrap(),
        b.mask.unwrap().as_f32().unwrap()
    );
    let (an, bn) = (a.negative.unwrap(), b.negative.unwrap());
    assert_eq!(an.0.as_f32().unwrap(), bn.0.as_f32().unwrap());
    assert!(an.1.is_none() && bn.1.is_none());
    assert_eq!(got.request.guidance_scale, 4.5);
    // The final latent payload too.
    let l = encode_latent(&want.initial_latent).unwrap();
    assert_eq!(
        decode_latent(&l).unwrap().as_f32().unwrap(),
        want.initial_latent.as_f32().unwrap()
    );
}

/// Flux-dev under true CFG: pooled and negative pooled embeddings and the embedded guidance scale
/// come back exactly, and the plan (FluxPipeline's shifted sigmas) is the sender's.
#[test]
fn a_flux_request_round_trips_with_pooled_embeddings_and_guidance() {
    let cfg = ModelConfig {
        caption_channels: 6,
        ..ModelConfig::preset("Flux.1-dev").unwrap()
    };
    let caption = Caption {
        embeds: model::gaussian(&[1, 3, 6], 1),
        mask: None,
        negative: Some((model::gaussian(&[1, 3, 6], 2), None)),
        pooled: Some(model::gaussian(&[1, 4], 3)),
        negative_pooled: Some(model::gaussian(&[1, 4], 4)),
    };
    let request = Request {
        class_labels: vec![],
        caption: Some(caption),
        guidance_scale: 2.0,
        latent_size: [8, 8],
        embedded_guidance: Some(3.5),
    };
    let scheduler = model::sampler::Scheduler::named("flux").unwrap();
    let noise = model::gaussian(&[1, 16, 8, 8], 5);
    let want = RequestSetup::new(
        3,
        &cfg,
        &request,
        &scheduler,
        4,
        &noise,
        vec![0..2, 2..4],
        1,
    )
    .unwrap()
    .with_cfg_degree(2)
    .unwrap();
    let schedule = ScheduleConfig {
        stages: 2,
        patches: 2,
        warmup: 1,
        steps: 4,
    };
    let bytes = encode_request(&want, &schedule).unwrap();
    let (got, _) = decode_request(&cfg, 3, &bytes).unwrap();
    assert_eq!(got.sampling, want.sampling);
    assert_eq!(got.cfg_degree(), 2);
    let (a, b) = (
        got.request.caption.clone().unwrap(),
        request.caption.unwrap(),
    );
    for (x, y) in [
        (a.pooled.unwrap(), b.pooled.unwrap()),
        (a.negative_pooled.unwrap(), b.negative_pooled.unwrap()),
    ] {
        assert_eq!(x.as_f32().unwrap(), y.as_f32().unwrap());
    }
    assert_eq!(got.request.embedded_guidance, Some(3.5));
    assert_eq!(got.prepared.text_tokens(), 3);
    // Each CFG group's frames carry its batch of image tokens plus the 3 prompt tokens.
    let part = topology::schedule::Part::Patch(0);
    assert_eq!(
        got.frame_shape(part, false, 1),
        Some(vec![1, 2 * 4 + 3, 3072])
    );
}

#[test]
fn bad_payloads_are_refused_naming_what_is_wrong() {
    let cfg = pixart();
    let (want, schedule) = setup(&cfg);
    let bytes = encode_request(&want, &schedule).unwrap();
    let err = |b: &[u8]| decode_request(&cfg, 7, b).expect_err("refused").to_string();
    assert!(err(b"PFRX\x01\0\0\0").contains("does not start with PFRQ"));
    let mut v2 = bytes.clone();
    v2[4] = 9;
    assert!(err(&v2).contains("version 9, this node reads version 2"));
    // Every truncation is refused, never a panic.
    for cut in 0..bytes.len() {
        decode_request(&cfg, 7, &bytes[..cut]).expect_err("a truncated payload");
    }
    let json_end = 12 + u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let e = err(&bytes[..json_end + 10]);
    assert!(e.contains("noise"), "{e}");
    // The noise's shape says more elements than the payload holds.
    let mut wrong = bytes.clone();
    let last_dim = json_end + 2 + 4 * 3;
    wrong[last_dim] = 200; // [1, 4, 8, 200]
    let e = err(&wrong);
    assert!(
        e.contains("noise: shape [1, 4, 8, 200] needs more bytes"),
        "{e}"
    );
    // One element more takes the caption's first bytes, and the caption is then refused.
    wrong[last_dim] = 9;
    let e = err(&wrong);
    assert!(e.contains("caption"), "{e}");
    // Trailing bytes.
    let mut long = bytes.clone();
    long.push(0);
    assert!(err(&long).contains("1 bytes after the last tensor"));
    // A reversed patch range in the header.
    let header = std::str::from_utf8(&bytes[12..json_end]).unwrap();
    let reversed = header.replace("[2,4]", "[4,2]");
    assert_ne!(reversed, header);
    let mut r = bytes[..8].to_vec();
    r.extend_from_slice(&(reversed.len() as u32).to_le_bytes());
    r.extend_from_slice(reversed.as_bytes());
    r.extend_from_slice(&bytes[json_end..]);
    assert!(err(&r).contains("patches[1]: range 4..2 is reversed"));
    // A final latent with garbage after it.
    let mut l = encode_latent(&want.initial_latent).unwrap();
    l.push(9);
    let e = decode_latent(&l).unwrap_err().to_string();
    assert!(e.contains("final latent: 1 bytes after the tensor"), "{e}");
}
