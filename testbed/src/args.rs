//! The command lines of the testbed's programs (`mesh-bench`, `mesh-soak`):
//! `--key value` or `--key=value`, one helper so each program only lists
//! its keys.
use anyhow::{ensure, Context, Result};

/// The arguments after the program name.
pub struct Args<I> {
    rest: I,
    /// The value given inline (`--key=value`) with the last key.
    inline: Option<String>,
    key: String,
}

impl<I: Iterator<Item = String>> Args<I> {
    pub fn new(rest: I) -> Self {
        Self {
            rest,
            inline: None,
            key: String::new(),
        }
    }

    /// The next key (`--key` of `--key=value`, or a bare argument).
    pub fn next_key(&mut self) -> Option<String> {
        let arg = self.rest.next()?;
        (self.key, self.inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        Some(self.key.clone())
    }

    /// The last key's value: inline, else the next argument.
    pub fn value(&mut self) -> Result<String> {
        match self.inline.take() {
            Some(v) => Ok(v),
            None => self.rest.next().with_context(|| format!("{} needs a value", self.key)),
        }
    }

    /// The last key's value as a whole number in `range`.
    pub fn number(&mut self, range: std::ops::RangeInclusive<u64>) -> Result<u64> {
        let v = self.value()?;
        let n: u64 = v
            .parse()
            .with_context(|| format!("{} {v:?} (a whole number)", self.key))?;
        ensure!(range.contains(&n), "{} must be in {range:?}", self.key);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Args<std::vec::IntoIter<String>> {
        Args::new(a.iter().map(|s| s.to_string()).collect::<Vec<_>>().into_iter())
    }

    #[test]
    fn keys_take_values_inline_or_next_and_numbers_are_bounded() {
        let mut a = args(&["--rounds=3", "--seconds", "10", "--quick", "--rate", "0"]);
        assert_eq!(a.next_key().as_deref(), Some("--rounds"));
        assert_eq!(a.number(1..=9).unwrap(), 3);
        assert_eq!(a.next_key().as_deref(), Some("--seconds"));
        assert_eq!(a.value().unwrap(), "10");
        assert_eq!(a.next_key().as_deref(), Some("--quick"));
        assert_eq!(a.next_key().as_deref(), Some("--rate"));
        let e = a.number(1..=5).unwrap_err().to_string();
        assert!(e.contains("--rate must be in 1..=5"), "{e}");
        assert_eq!(a.next_key(), None);
        let mut a = args(&["--json"]);
        a.next_key();
        assert_eq!(a.value().unwrap_err().to_string(), "--json needs a value");
        let mut a = args(&["--probe", "x"]);
        a.next_key();
        assert!(a.number(1..=5).unwrap_err().to_string().contains("(a whole number)"));
    }
}
