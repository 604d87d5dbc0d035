//! The official OpenAI Python client (pinned in tools/openai-client.txt, installed under
//! target/py-openai by tools/fetch_openai_client.sh, which this test runs) pointed at
//! `pipefuse serve`: `images.generate(...)` gets PNG images, equal to what `pipefuse generate`
//! draws; `models.list()` names the model; a bad request raises the client's BadRequestError
//! (400), a wrong key its AuthenticationError (401).

use std::process::Command;

mod common;
mod http_common;

use http_common::Served;

const SCRIPT: &str = r#"
import base64, os, sys
from openai import OpenAI
import openai
base, out = sys.argv[1], sys.argv[2]
c = OpenAI(base_url=base + "/v1", api_key="sesame", max_retries=0)
print("models", ",".join(m.id for m in c.models.list().data))
r = c.images.generate(model="digits-dit", prompt="7", n=2, size="16x16",
                      response_format="b64_json", extra_body={"seed": 11, "steps": 6})
for i, d in enumerate(r.data):
    with open(os.path.join(out, f"openai_{i}.png"), "wb") as f:
        f.write(base64.b64decode(d.b64_json))
print("images", len(r.data), "created", r.created)
try:
    c.images.generate(prompt="12")
except openai.BadRequestError as e:
    print("bad request", e.status_code, e.body["param"])
try:
    OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
except openai.AuthenticationError as e:
    print("refused", e.status_code)
"#;

#[test]
fn the_openai_python_client_gets_png_images() {
    let fetch = Command::new(common::root().join("tools/fetch_openai_client.sh"))
        .output()
        .unwrap();
    assert!(
        fetch.status.success(),
        "installing the OpenAI client failed: {}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    let pythonpath = String::from_utf8(fetch.stdout).unwrap().trim().to_string();
    let s = Served::start("openai", &["--api-key", "sesame"]);
    let dir = common::scratch_dir("openai-client");
    let o = Command::new("python3")
        .args(["-c", SCRIPT, &s.base, dir.to_str().unwrap()])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.log()
    );
    assert!(stdout.contains("models digits-dit\n"), "{stdout}");
    assert!(stdout.contains("images 2 created "), "{stdout}");
    assert!(stdout.contains("bad request 400 prompt\n"), "{stdout}");
    assert!(stdout.contains("refused 401\n"), "{stdout}");
    // The client's images are generate's.
    let grid = http_common::generate_grid(
        &dir,
        &[
            "--class-label",
            "7",
            "--class-label",
            "7",
            "--seed",
            "11",
            "--steps",
            "6",
        ],
    );
    for i in 0..2u32 {
        let img = image::open(dir.join(format!("openai_{i}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
        http_common::assert_is_tile(&img, &grid, i);
    }
    let _ = std::fs::remove_dir_all(dir);
}
