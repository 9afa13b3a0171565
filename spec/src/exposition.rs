//! Content negotiation for kiln's `/metrics` endpoints. Metrics are encoded as OpenMetrics;
//! a scraper that does not ask for it (Prometheus asks; curl, promtool and older scrapers do
//! not) gets the same families in the classic text format 0.0.4, where a counter's family is
//! named with its `_total` sample and there is no `# EOF` — as Prometheus' own client
//! libraries do.

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type and body for a request with `accept`, from an OpenMetrics exposition.
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (OPENMETRICS, openmetrics)
    } else {
        (TEXT, to_text_format(&openmetrics))
    }
}

/// The classic text format of an OpenMetrics exposition of gauges, counters and histograms.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE, which decides the name it goes under.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some((name, text)) = help.take() {
            out.push_str(&format!("# HELP {name} {text}\n"));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP kiln_x_events Events seen.\n# TYPE kiln_x_events counter\n\
                      kiln_x_events_total{service=\"tftp\"} 3\n\
                      # HELP kiln_x_up Whether it is up.\n# TYPE kiln_x_up gauge\nkiln_x_up 1\n\
                      # HELP kiln_x_seconds Time taken.\n# TYPE kiln_x_seconds histogram\n\
                      # UNIT kiln_x_seconds seconds\n\
                      kiln_x_seconds_sum 1.5\nkiln_x_seconds_count 2\n\
                      kiln_x_seconds_bucket{le=\"+Inf\"} 2\n# EOF\n";

    #[test]
    fn counters_take_their_sample_name_and_the_end_marker_goes() {
        assert_eq!(
            to_text_format(OM),
            "# HELP kiln_x_events_total Events seen.\n# TYPE kiln_x_events_total counter\n\
             kiln_x_events_total{service=\"tftp\"} 3\n\
             # HELP kiln_x_up Whether it is up.\n# TYPE kiln_x_up gauge\nkiln_x_up 1\n\
             # HELP kiln_x_seconds Time taken.\n# TYPE kiln_x_seconds histogram\n\
             kiln_x_seconds_sum 1.5\nkiln_x_seconds_count 2\n\
             kiln_x_seconds_bucket{le=\"+Inf\"} 2\n"
        );
    }

    #[test]
    fn a_scraper_that_asks_for_openmetrics_gets_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            negotiate(Some(prometheus), OM.into()),
            (OPENMETRICS, OM.into())
        );
        assert_eq!(negotiate(None, OM.into()).0, TEXT);
        assert_eq!(negotiate(Some("*/*"), OM.into()).0, TEXT);
    }
}
