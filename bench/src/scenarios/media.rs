//! The `media` scenario: what the endpoints forwarded as they are cost
//! (`/v1/audio/speech`, `/v1/audio/transcriptions`), on a standalone gateway of its own
//! with the default budgets spelled out.
//!
//! - **Speech relayed**: 16 MiB audio answers, one at a time, direct and through the
//!   gateway (three interleaved rounds, median): the time to read a whole answer and the
//!   gateway's ratio to direct; then 16 at once: the gateway's peak RSS over idle. The
//!   answers are relayed as they arrive, so 16 × 16 MiB must not show in its memory.
//! - **Uploads**: 25 MiB multipart transcription uploads (just under `--max-upload-bytes`),
//!   1, 4 and 16 at once: peak RSS against the request memory admitted in flight, the
//!   uploads answered and those refused with `503 overloaded`, and normal requests
//!   answered meanwhile.

use std::{net::SocketAddr, time::Duration};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;

use super::{Gateway, Settings, measure_burst, note_errors, report_burst, us};
use crate::{load::Target, report::Report};

/// Bytes of one speech answer (`config::MEDIA`: 256 chunks of 64 KiB).
const SPEECH_BYTES: f64 = 16.0 * 1024.0 * 1024.0;

/// Bytes of the uploaded file: 25 MiB less room for the form's other parts.
const FILE_BYTES: usize = 25 * 1024 * 1024 - 4096;

const BOUNDARY: &str = "benchBoundary7MA4YWxkTrZu0gW";

/// A transcription upload of [`FILE_BYTES`] for `model`.
pub fn upload(model: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(FILE_BYTES + 512);
    b.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n\
             --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"meeting.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    b.extend((0..FILE_BYTES).map(|i| (i % 251) as u8));
    b.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    b.freeze()
}

pub(super) async fn run(
    s: &Settings,
    report: &mut Report,
    upstream: SocketAddr,
) -> anyhow::Result<()> {
    const SCENARIO: &str =
        "Audio (16 MiB speech answers relayed; 25 MiB uploads; 256 MiB in-flight budget)";
    let mib = |kib: u64| kib as f64 / 1024.0;
    let bytes_mib = |b: f64| b / (1024.0 * 1024.0);
    let resources = s.work.join("resources");
    let mut gw = Gateway::start_from(
        s,
        "tollgate (media)",
        "--resources",
        &resources,
        None,
        &[
            "--max-inflight-bytes",
            "268435456",
            "--max-upload-bytes",
            "26214400",
        ],
    )?;
    let normal = gw.target("bench-small", false);

    // Speech, one answer at a time: direct, then through the gateway, three rounds.
    let speech = Bytes::from(
        serde_json::json!({"model": "bench-speech", "input": "The quick brown fox.", "voice": "alloy"})
            .to_string(),
    );
    let direct = Target {
        addr: upstream,
        path: "/small/0/256/0/v1/audio/speech".to_owned(),
        auth: None,
        body: speech.clone(),
        content_type: None,
    };
    let through = Target {
        path: "/v1/audio/speech".to_owned(),
        body: speech,
        ..gw.target("bench-speech", false)
    };
    let count = s.scale(30, 8) as usize;
    let mut p50 = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, (who, target)) in [("direct", &direct), ("tollgate", &through)]
            .into_iter()
            .enumerate()
        {
            let probed = crate::hostile::probe(target, 2, count).await;
            note_errors(report, SCENARIO, who, &probed.stats);
            p50[i].push(probed.stats.p50_us);
        }
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let (direct_p50, gateway_p50) = (median(&mut p50[0]), median(&mut p50[1]));
    report.add(
        SCENARIO,
        "direct",
        "one 16 MiB answer, p50",
        us(direct_p50) / 1000.0,
        "ms",
    );
    let row = report.add(
        SCENARIO,
        "tollgate",
        "one 16 MiB answer, p50",
        us(gateway_p50) / 1000.0,
        "ms",
    );
    row.baseline = Some(("direct".to_owned(), us(direct_p50) / 1000.0));
    row.ratio = Some(gateway_p50 as f64 / direct_p50.max(1) as f64);
    let row = report.add(
        SCENARIO,
        "tollgate",
        "relay throughput, one answer",
        SPEECH_BYTES / 1024.0 / 1024.0 / (gateway_p50.max(1) as f64 / 1e6),
        "MiB/s",
    );
    row.baseline = Some((
        "direct".to_owned(),
        SPEECH_BYTES / 1024.0 / 1024.0 / (direct_p50.max(1) as f64 / 1e6),
    ));

    // Sixteen answers at once: relayed, not held.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = gw.proc.rss_kib()?;
    report.add(
        SCENARIO,
        "idle, after the speech rounds",
        "RSS",
        mib(idle),
        "MiB",
    );
    let m = measure_burst(&mut gw, &through, 16, &normal).await?;
    let who = "16 speech answers at once";
    let growth = mib(m.peak_kib.saturating_sub(idle));
    let row = report.add(SCENARIO, who, "RSS growth over idle", growth, "MiB");
    row.baseline = Some(("answers' bytes".to_owned(), 16.0 * bytes_mib(SPEECH_BYTES)));
    row.ratio = Some(growth / (16.0 * bytes_mib(SPEECH_BYTES)));
    row.target = Some("≤ 1/4 of the answers' bytes (relayed, not held)".to_owned());
    row.met = Some(growth <= 4.0 * bytes_mib(SPEECH_BYTES));
    let row = report.add(
        SCENARIO,
        who,
        "answered 200",
        m.burst.count("200") as f64,
        "count",
    );
    row.target = Some("16".to_owned());
    row.met = Some(m.burst.count("200") == 16);

    // Uploads just under --max-upload-bytes.
    let uploads = Target {
        path: "/v1/audio/transcriptions".to_owned(),
        body: upload("bench-transcribe"),
        content_type: Some(
            HeaderValue::from_str(&format!("multipart/form-data; boundary={BOUNDARY}"))
                .expect("the boundary is header-safe"),
        ),
        ..gw.target("bench-transcribe", false)
    };
    let sizes: &[usize] = if s.quick { &[1, 4, 8] } else { &[1, 4, 16] };
    for &n in sizes {
        let who = if n == 1 {
            "1 upload".to_owned()
        } else {
            format!("{n} uploads at once")
        };
        let m = measure_burst(&mut gw, &uploads, n, &normal).await?;
        report_burst(report, SCENARIO, &who, &m, idle, n == 1);
        let during = &m.during.stats;
        let normal_who = format!("normal requests during {who}");
        let row = report.add(SCENARIO, &normal_who, "answered", during.ok as f64, "count");
        row.target = Some("all".to_owned());
        row.met = Some(during.ok > 0 && during.failed() == 0);
        note_errors(report, SCENARIO, &normal_who, during);
        report.add(
            SCENARIO,
            &normal_who,
            "p99 latency",
            us(during.p99_us),
            "µs",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upload_is_a_form_just_under_the_default_limit() {
        let body = upload("bench-transcribe");
        assert!(body.len() < 25 * 1024 * 1024, "under --max-upload-bytes");
        assert!(body.len() > 25 * 1024 * 1024 - 8192);
        let text = String::from_utf8_lossy(&body[..300]);
        assert!(
            text.contains("name=\"model\"\r\n\r\nbench-transcribe\r\n"),
            "{text}"
        );
        assert!(body.ends_with(format!("--{BOUNDARY}--\r\n").as_bytes()));
    }
}
