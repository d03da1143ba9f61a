//! Links in what the proxy subresources pass back, as upstream's proxy transport
//! rewrites them: an absolute path on the proxied host (`/rewriteme`) becomes a path
//! through the proxy (`/api/v1/namespaces/ns/pods/p/proxy/rewriteme`), in `Location`
//! headers and in the URL attributes of HTML tags (`<a href>`, `<img src>`, ...). Links
//! to other hosts and relative ones are left alone. Tags that carry such an attribute
//! are written back as upstream's tokenizer writes tokens (lower-case names, values in
//! double quotes, escaped); everything else is copied byte for byte.

/// Which attributes of which tags hold URLs (upstream's `atomsToAttrs`).
const URL_ATTRIBUTES: &[(&str, &[&str])] = &[
    ("a", &["href"]),
    ("applet", &["codebase"]),
    ("area", &["href"]),
    ("audio", &["src"]),
    ("base", &["href"]),
    ("blockquote", &["cite"]),
    ("body", &["background"]),
    ("button", &["formaction"]),
    ("command", &["icon"]),
    ("del", &["cite"]),
    ("embed", &["src"]),
    ("form", &["action"]),
    ("frame", &["longdesc", "src"]),
    ("head", &["profile"]),
    ("html", &["manifest"]),
    ("iframe", &["longdesc", "src"]),
    ("img", &["longdesc", "src", "usemap"]),
    ("input", &["src", "usemap", "formaction"]),
    ("ins", &["cite"]),
    ("link", &["href"]),
    ("object", &["classid", "codebase", "data", "usemap"]),
    ("q", &["cite"]),
    ("script", &["src"]),
    ("source", &["src"]),
    ("video", &["poster", "src"]),
];

/// How links are rewritten: the proxy's path prefix, and the hosts that count as the
/// proxied one (the target's address and the client's `Host`).
pub struct Rewriter {
    pub prefix: String,
    pub hosts: Vec<String>,
}

impl Rewriter {
    /// One URL, as upstream's `rewriteURL` (with the scheme and host dropped, as the
    /// API server's own transport has none).
    pub fn url(&self, url: &str) -> String {
        // What follows `scheme://` or `//`: the host, then the path.
        let authority = url
            .strip_prefix("//")
            .or_else(|| url.split_once("://").filter(|(scheme, _)| is_scheme(scheme)).map(|(_, after)| after));
        let rest = match authority {
            Some(after) => {
                let end = after.find(['/', '?', '#']).unwrap_or(after.len());
                if !self.hosts.iter().any(|h| h == &after[..end]) {
                    return url.to_string();
                }
                &after[end..]
            }
            None => url,
        };
        let end = rest.find(['?', '#']).unwrap_or(rest.len());
        let (path, tail) = rest.split_at(end);
        if !path.starts_with('/') {
            return url.to_string();
        }
        if path.starts_with(&self.prefix) {
            return format!("{path}{tail}");
        }
        let mut joined = clean(&format!("{}/{}", self.prefix, path));
        if path.ends_with('/') && !joined.ends_with('/') {
            joined.push('/');
        }
        format!("{joined}{tail}")
    }

    /// An HTML document with its tags' URL attributes rewritten.
    pub fn html(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 64);
        let mut rest = text;
        while let Some(start) = rest.find('<') {
            out.push_str(&rest[..start]);
            rest = &rest[start..];
            if let Some(after) = rest.strip_prefix("<!--") {
                let end = after.find("-->").map(|i| i + 3).unwrap_or(after.len());
                out.push_str(&rest[..4 + end]);
                rest = &after[end..];
                continue;
            }
            let Some(tag) = Tag::parse(rest) else {
                out.push('<');
                rest = &rest[1..];
                continue;
            };
            let raw = &rest[..tag.len];
            rest = &rest[tag.len..];
            match URL_ATTRIBUTES.iter().find(|(name, _)| *name == tag.name) {
                Some((_, attributes)) => out.push_str(&tag.render(|key, value| {
                    if attributes.contains(&key) {
                        self.url(value)
                    } else {
                        value.to_string()
                    }
                })),
                None => out.push_str(raw),
            }
            // Script and style bodies are text, not markup.
            if matches!(tag.name.as_str(), "script" | "style") && !tag.self_closing {
                let close = format!("</{}", tag.name);
                let end = rest.to_ascii_lowercase().find(&close).unwrap_or(rest.len());
                out.push_str(&rest[..end]);
                rest = &rest[end..];
            }
        }
        out.push_str(rest);
        out
    }
}

fn is_scheme(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// Go's `path.Clean` for absolute paths: no empty, `.` or resolved `..` segments.
pub fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A start tag: its lower-case name, attributes (values unescaped) and length in bytes.
struct Tag {
    name: String,
    attributes: Vec<(String, String)>,
    self_closing: bool,
    len: usize,
}

impl Tag {
    fn parse(text: &str) -> Option<Tag> {
        let bytes = text.as_bytes();
        let mut i = 1;
        let name_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
            i += 1;
        }
        if i == name_start || !bytes[name_start].is_ascii_alphabetic() {
            return None;
        }
        let name = text[name_start..i].to_ascii_lowercase();
        let mut attributes = Vec::new();
        let mut self_closing = false;
        loop {
            while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b'/') {
                self_closing = bytes[i] == b'/';
                i += 1;
            }
            if i >= bytes.len() {
                return None;
            }
            if bytes[i] == b'>' {
                return Some(Tag { name, attributes, self_closing, len: i + 1 });
            }
            self_closing = false;
            let key_start = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() && !b"=>/".contains(&bytes[i]) {
                i += 1;
            }
            let key = text[key_start..i].to_ascii_lowercase();
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            let mut value = String::new();
            if i < bytes.len() && bytes[i] == b'=' {
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                let (start, end) = match bytes.get(i) {
                    Some(&q @ (b'"' | b'\'')) => {
                        let end = i + 1 + text[i + 1..].find(q as char)?;
                        (i + 1, end)
                    }
                    _ => {
                        let len =
                            text[i..].find(|c: char| c.is_ascii_whitespace() || c == '>').unwrap_or(text.len() - i);
                        (i, i + len)
                    }
                };
                value = unescape(&text[start..end]);
                i = if bytes.get(end).is_some_and(|b| *b == b'"' || *b == b'\'') { end + 1 } else { end };
            }
            attributes.push((key, value));
        }
    }

    /// The tag as upstream's `Token.String` writes it, each value through `value`.
    fn render(&self, value: impl Fn(&str, &str) -> String) -> String {
        let mut out = format!("<{}", self.name);
        for (key, v) in &self.attributes {
            out.push_str(&format!(" {key}=\"{}\"", escape(&value(key, v))));
        }
        out.push_str(if self.self_closing { "/>" } else { ">" });
        out
    }
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// Go's `html.EscapeString`.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('\'', "&#39;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&#34;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewriter() -> Rewriter {
        Rewriter { prefix: "/api/v1/namespaces/ns/pods/p/proxy".into(), hosts: vec!["10.0.0.5:80".into()] }
    }

    #[test]
    fn absolute_paths_on_the_proxied_host_go_through_the_proxy() {
        let r = rewriter();
        assert_eq!(r.url("/rewriteme"), "/api/v1/namespaces/ns/pods/p/proxy/rewriteme");
        assert_eq!(r.url("/a/b/?x=1#f"), "/api/v1/namespaces/ns/pods/p/proxy/a/b/?x=1#f");
        assert_eq!(r.url("http://10.0.0.5:80/x"), "/api/v1/namespaces/ns/pods/p/proxy/x");
        assert_eq!(r.url("http://example.com/x"), "http://example.com/x");
        assert_eq!(r.url("relative/x"), "relative/x");
        assert_eq!(r.url("/api/v1/namespaces/ns/pods/p/proxy/y"), "/api/v1/namespaces/ns/pods/p/proxy/y");
    }

    #[test]
    fn html_tags_with_url_attributes_are_rewritten_and_the_rest_kept() {
        let r = rewriter();
        assert_eq!(
            r.html(r#"<a href="/rewriteme">test</a>"#),
            r#"<a href="/api/v1/namespaces/ns/pods/p/proxy/rewriteme">test</a>"#
        );
        assert_eq!(
            r.html("<IMG SRC='/i.png' alt=x /><p class=\"c\">/kept</p><!-- <a href=\"/no\"> -->"),
            "<img src=\"/api/v1/namespaces/ns/pods/p/proxy/i.png\" alt=\"x\"/><p class=\"c\">/kept</p><!-- <a href=\"/no\"> -->"
        );
        assert_eq!(
            r.html("<script>if (a<b) { x = '<a href=\"/s\">' }</script>"),
            "<script>if (a<b) { x = '<a href=\"/s\">' }</script>"
        );
        assert_eq!(r.html("a < b and <a"), "a < b and <a");
    }
}
