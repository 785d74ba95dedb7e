//! Reading an nginx config: tokens, blocks of directives with their file and line, and
//! `include`s followed (globs too), relative to the including file.

use super::{Directive, ImportError};
use std::path::{Path, PathBuf};

#[derive(Debug, PartialEq)]
enum Token {
    Word(String, usize),
    Open(usize),
    Close(usize),
    Semi(usize),
}

fn tokenize(text: &str, file: &Path) -> Result<Vec<Token>, ImportError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '{' => {
                tokens.push(Token::Open(line));
                chars.next();
            }
            '}' => {
                tokens.push(Token::Close(line));
                chars.next();
            }
            ';' => {
                tokens.push(Token::Semi(line));
                chars.next();
            }
            '"' | '\'' => {
                let quote = c;
                let start = line;
                chars.next();
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => {
                            return Err(ImportError(format!(
                                "{}:{start}: unterminated quoted string",
                                file.display()
                            )))
                        }
                        Some('\\') => {
                            if let Some(n) = chars.next() {
                                word.push(n);
                            }
                        }
                        Some(ch) if ch == quote => break,
                        Some(ch) => {
                            if ch == '\n' {
                                line += 1;
                            }
                            word.push(ch);
                        }
                    }
                }
                tokens.push(Token::Word(word, start));
            }
            _ => {
                let mut word = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || matches!(ch, '{' | '}' | ';') {
                        break;
                    }
                    if ch == '#' && word.is_empty() {
                        break;
                    }
                    word.push(ch);
                    chars.next();
                }
                tokens.push(Token::Word(word, line));
            }
        }
    }
    Ok(tokens)
}

/// Blocks nested deeper than this are refused (real configs nest three or four levels;
/// the parser recurses once per level).
const MAX_BLOCK_DEPTH: usize = 32;

fn parse_block(
    tokens: &[Token],
    pos: &mut usize,
    file: &Path,
    depth: usize,
) -> Result<Vec<Directive>, ImportError> {
    let nested = depth > 0;
    if depth > MAX_BLOCK_DEPTH {
        return Err(ImportError(format!(
            "{}: blocks nested deeper than {MAX_BLOCK_DEPTH} levels",
            file.display()
        )));
    }
    let mut out = Vec::new();
    while *pos < tokens.len() {
        match &tokens[*pos] {
            Token::Close(l) => {
                if !nested {
                    return Err(ImportError(format!(
                        "{}:{l}: unexpected }}",
                        file.display()
                    )));
                }
                *pos += 1;
                return Ok(out);
            }
            Token::Open(l) | Token::Semi(l) => {
                return Err(ImportError(format!(
                    "{}:{l}: unexpected {{ or ;",
                    file.display()
                )))
            }
            Token::Word(name, line) => {
                let (name, line) = (name.clone(), *line);
                *pos += 1;
                let mut args = Vec::new();
                loop {
                    match tokens.get(*pos) {
                        Some(Token::Word(w, _)) => {
                            args.push(w.clone());
                            *pos += 1;
                        }
                        Some(Token::Semi(_)) => {
                            *pos += 1;
                            out.push(Directive {
                                name,
                                args,
                                block: None,
                                file: file.to_path_buf(),
                                line,
                            });
                            break;
                        }
                        Some(Token::Open(_)) => {
                            *pos += 1;
                            let block = parse_block(tokens, pos, file, depth + 1)?;
                            out.push(Directive {
                                name,
                                args,
                                block: Some(block),
                                file: file.to_path_buf(),
                                line,
                            });
                            break;
                        }
                        Some(Token::Close(l)) => {
                            return Err(ImportError(format!(
                                "{}:{l}: missing ; after {name}",
                                file.display()
                            )))
                        }
                        None => {
                            return Err(ImportError(format!(
                                "{}:{line}: unexpected end of file after {name}",
                                file.display()
                            )))
                        }
                    }
                }
            }
        }
    }
    if nested {
        return Err(ImportError(format!(
            "{}: missing }} at end of file",
            file.display()
        )));
    }
    Ok(out)
}

/// Parses a file and splices in its `include`s (relative paths resolve against the
/// directory of the file that includes them; `*` globs the last path component).
pub fn parse_file(path: &Path) -> Result<Vec<Directive>, ImportError> {
    parse_file_depth(path, 0)
}

fn parse_file_depth(path: &Path, depth: usize) -> Result<Vec<Directive>, ImportError> {
    if depth > 16 {
        return Err(ImportError(format!(
            "{}: includes nested too deep (a loop?)",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ImportError(format!("cannot read {}: {e}", path.display())))?;
    let tokens = tokenize(&text, path)?;
    let mut pos = 0;
    let tree = parse_block(&tokens, &mut pos, path, 0)?;
    expand_includes(tree, path, depth)
}

fn expand_includes(
    tree: Vec<Directive>,
    path: &Path,
    depth: usize,
) -> Result<Vec<Directive>, ImportError> {
    let mut out = Vec::new();
    for mut d in tree {
        if d.name == "include" && d.block.is_none() {
            let base = path.parent().unwrap_or(Path::new("."));
            for pattern in &d.args {
                let files = glob(base, pattern);
                if files.is_empty() && !pattern.contains('*') {
                    return Err(ImportError(format!(
                        "{}:{}: include {pattern}: no such file",
                        d.file.display(),
                        d.line
                    )));
                }
                for f in files {
                    out.extend(parse_file_depth(&f, depth + 1)?);
                }
            }
            continue;
        }
        if let Some(block) = d.block.take() {
            d.block = Some(expand_includes(block, path, depth)?);
        }
        out.push(d);
    }
    Ok(out)
}

fn glob(base: &Path, pattern: &str) -> Vec<PathBuf> {
    let full = if Path::new(pattern).is_absolute() {
        PathBuf::from(pattern)
    } else {
        base.join(pattern)
    };
    let Some(name) = full
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
    else {
        return Vec::new();
    };
    if !name.contains('*') {
        return if full.exists() {
            vec![full]
        } else {
            Vec::new()
        };
    }
    let dir = full.parent().unwrap_or(Path::new(".")).to_path_buf();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| wildcard(&name, n))
        })
        .collect();
    found.sort();
    found
}

fn wildcard(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            name.starts_with(head)
                && (0..=name.len() - head.len()).any(|i| {
                    name.is_char_boundary(head.len() + i) && wildcard(rest, &name[head.len() + i..])
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::nginx::{listen_addr, nginx_size, nginx_time};

    #[test]
    fn tokens_handle_quotes_comments_and_lines() {
        let t = tokenize("a 'b c' \"d;\" # x {\n e { f; }", Path::new("t")).unwrap();
        assert_eq!(
            t,
            vec![
                Token::Word("a".into(), 1),
                Token::Word("b c".into(), 1),
                Token::Word("d;".into(), 1),
                Token::Word("e".into(), 2),
                Token::Open(2),
                Token::Word("f".into(), 2),
                Token::Semi(2),
                Token::Close(2),
            ]
        );
        assert!(tokenize("a 'open", Path::new("t")).is_err());
    }

    #[test]
    fn broken_syntax_is_an_error_with_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.conf");
        std::fs::write(&p, "http {\n  upstream x {\n    server a:1\n  }\n").unwrap();
        let e = parse_file(&p).unwrap_err().to_string();
        assert!(e.contains(":4: missing ;"), "{e}");
    }

    #[test]
    fn units_and_addresses_translate() {
        assert_eq!(nginx_time("30"), "30s");
        assert_eq!(nginx_time("500ms"), "500ms");
        assert_eq!(nginx_size("10m").as_deref(), Some("10MiB"));
        assert_eq!(nginx_size("0").as_deref(), Some("1GiB"));
        assert_eq!(nginx_size("10x"), None);
        assert_eq!(listen_addr("443"), "0.0.0.0:443");
        assert_eq!(listen_addr("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(listen_addr("[::]:80"), "[::]:80");
        assert!(wildcard("*.conf", "a.conf") && !wildcard("*.conf", "a.conf.bak"));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<Vec<Directive>, ImportError> {
        let file = Path::new("nginx.conf");
        let tokens = tokenize(text, file)?;
        let mut pos = 0;
        parse_block(&tokens, &mut pos, file, 0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any text: directives or an error with a line, never a panic.
        #[test]
        fn any_text_parses_or_is_an_error(text in "[a-z0-9 {};#\"'\\\\$\n\t]{0,300}") {
            let _ = parse(&text);
        }

        /// Directives written out come back as they were.
        #[test]
        fn written_directives_parse_back(
            dirs in proptest::collection::vec(("[a-z_]{1,12}", proptest::collection::vec("[a-z0-9./:_-]{1,16}", 0..4)), 1..8)
        ) {
            let text: String = dirs
                .iter()
                .map(|(n, args)| format!("{n} {};\n", args.join(" ")))
                .collect();
            let parsed = parse(&text).unwrap();
            prop_assert_eq!(parsed.len(), dirs.len());
            for (d, (n, args)) in parsed.iter().zip(&dirs) {
                prop_assert_eq!(&d.name, n);
                prop_assert_eq!(&d.args, args);
            }
        }
    }

    /// Regression: the block parser recursed once per level without a bound, so a
    /// deeply nested file overflowed the stack.
    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let text = format!("{}{}", "a {".repeat(100_000), "}".repeat(100_000));
        let e = parse(&text).unwrap_err();
        assert!(e.0.contains("nested deeper than 32"), "{}", e.0);
    }
}
