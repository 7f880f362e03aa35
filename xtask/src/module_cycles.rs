//! `cargo xtask lint`'s layering check: no import cycles among a crate's modules.
//!
//! House rule (issue 17): inside a crate, "module A uses an item of module B" is a
//! directed acyclic graph, so `kernel <-> pinning`, `store -> export -> store` or
//! `auth -> error -> store -> auth` are reported. A child using its parent's items
//! (`super::Thing`) or a parent using its children is the tree itself, not an edge. Test-only modules (`#[cfg(test)]`) are skipped: they
//! may reach anywhere.
//!
//! rustc has no lint for this and `cargo-modules --acyclic` counts every parent/child
//! use as a cycle (and needs rust-analyzer), so the check parses the sources with `syn`
//! and resolves `crate::`, `super::`, `self::` and child-relative paths itself. Paths
//! through re-exports resolve to the module that re-exports them, which is the
//! dependency a reader sees.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use syn::visit::Visit;

/// A module's absolute path inside its crate (`[]` is the crate root).
type ModPath = Vec<String>;

/// Checks the crates whose root files are `roots` (`(name, lib.rs or main.rs)`).
/// Returns the cycles found, one line each (empty: none).
pub fn check(roots: &[(String, PathBuf)]) -> Result<Vec<String>> {
    let mut cycles = Vec::new();
    for (name, root) in roots {
        let mut tree = Tree::default();
        tree.load(root, &[], true)?;
        for cycle in tree.cycles() {
            cycles.push(format!("{name}: {cycle}"));
        }
    }
    Ok(cycles)
}

/// The file a `#[path = "..."]` attribute names for a `mod x;`, if it has one.
fn path_attribute(module: &syn::ItemMod) -> Option<String> {
    module.attrs.iter().find_map(|attr| {
        let syn::Meta::NameValue(pair) = &attr.meta else {
            return None;
        };
        if !pair.path.is_ident("path") {
            return None;
        }
        match &pair.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(text),
                ..
            }) => Some(text.value()),
            _ => None,
        }
    })
}

/// The crate's module tree and, per module, the paths its code names.
#[derive(Default)]
struct Tree {
    /// Every module, with the `crate::`-absolute paths named in it (unresolved).
    modules: BTreeMap<ModPath, Vec<ModPath>>,
}

impl Tree {
    /// Parses the file of module `path` and, recursively, its `mod x;` children.
    /// `owns_dir`: the file is `lib.rs`/`main.rs`/`mod.rs` (children sit beside it).
    fn load(&mut self, file: &Path, path: &[String], owns_dir: bool) -> Result<()> {
        let text =
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let parsed =
            syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        let dir = if owns_dir {
            file.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            file.with_extension("")
        };
        self.items(&parsed.items, path, &dir, file)
    }

    fn items(
        &mut self,
        items: &[syn::Item],
        path: &[String],
        dir: &Path,
        file: &Path,
    ) -> Result<()> {
        self.modules.entry(path.to_vec()).or_default();
        let mut names = Names::default();
        for item in items {
            if is_test_only(item) {
                continue;
            }
            if let syn::Item::Mod(module) = item {
                let mut child = path.to_vec();
                child.push(module.ident.to_string());
                if let Some((_, inline)) = &module.content {
                    self.items(inline, &child, &dir.join(module.ident.to_string()), file)?;
                } else if let Some(target) = path_attribute(module) {
                    // `#[path = "..."]`: relative to the declaring file's folder, and read
                    // like a `mod.rs` (rustc's rule).
                    let folder = file.parent().map(Path::to_path_buf).unwrap_or_default();
                    self.load(&folder.join(target), &child, true)?;
                } else {
                    let name = module.ident.to_string();
                    let flat = dir.join(format!("{name}.rs"));
                    let nested = dir.join(&name).join("mod.rs");
                    if flat.is_file() {
                        self.load(&flat, &child, false)?;
                    } else if nested.is_file() {
                        self.load(&nested, &child, true)?;
                    } else {
                        bail!(
                            "{}: `mod {name};` has neither {} nor {}",
                            file.display(),
                            flat.display(),
                            nested.display()
                        );
                    }
                }
                continue;
            }
            names.visit_item(item);
        }
        let found = names.found;
        self.modules.entry(path.to_vec()).or_default().extend(found);
        Ok(())
    }

    /// The longest module path that prefixes `named` (the module an item lives in).
    fn owner(&self, named: &[String]) -> ModPath {
        (0..=named.len())
            .rev()
            .map(|n| named[..n].to_vec())
            .find(|p| self.modules.contains_key(p))
            .unwrap_or_default()
    }

    /// "Uses" edges between modules neither of which is the other's ancestor, with one
    /// example use each.
    fn edges(&self) -> BTreeMap<(String, String), String> {
        let mut edges = BTreeMap::new();
        for (from, named) in &self.modules {
            for name in named {
                let resolved = self.resolve(from, name);
                let to = self.owner(&resolved);
                let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
                // An ancestor or descendant: the tree itself, not a dependency.
                if common == from.len() || common == to.len() {
                    continue;
                }
                edges
                    .entry((show(from), show(&to)))
                    .or_insert_with(|| format!("{} uses {}", show(from), show(&resolved)));
            }
        }
        edges
    }

    /// `name` as written in module `from`, made absolute: `crate::`, `super::`,
    /// `self::` and a first segment naming one of `from`'s children.
    fn resolve(&self, from: &[String], name: &[String]) -> ModPath {
        let mut base: ModPath = from.to_vec();
        let mut rest = name;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop();
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                let mut child = from.to_vec();
                child.push(first.to_owned());
                if !self.modules.contains_key(&child) {
                    // An external crate, a prelude or local item: not a module of ours.
                    return from.to_vec();
                }
            }
            None => {}
        }
        base.extend(rest.iter().cloned());
        base
    }

    /// Each strongly connected group of modules, as `{a, b} use each other; examples`.
    fn cycles(&self) -> Vec<String> {
        let edges = self.edges();
        let graph: BTreeMap<&str, BTreeSet<&str>> =
            edges.keys().fold(BTreeMap::new(), |mut g, (a, b)| {
                g.entry(a.as_str()).or_default().insert(b.as_str());
                g.entry(b.as_str()).or_default();
                g
            });
        let mut out = Vec::new();
        for group in strongly_connected(&graph) {
            if group.len() < 2 {
                continue;
            }
            let mut line = format!("{{{}}} use each other", group.join(", "));
            for ((a, b), example) in &edges {
                if group.contains(&a.as_str()) && group.contains(&b.as_str()) {
                    let _ = write!(line, "; {example}");
                }
            }
            out.push(line);
        }
        out
    }
}

fn show(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_owned()
    } else {
        format!("crate::{}", path.join("::"))
    }
}

/// `#[cfg(test)]` on an item.
fn is_test_only(item: &syn::Item) -> bool {
    match item {
        syn::Item::Mod(m) => cfg_test(&m.attrs),
        syn::Item::Fn(f) => cfg_test(&f.attrs),
        syn::Item::Use(u) => cfg_test(&u.attrs),
        syn::Item::Impl(i) => cfg_test(&i.attrs),
        _ => false,
    }
}

fn cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg")
            && attr
                .parse_args::<syn::Path>()
                .is_ok_and(|p| p.is_ident("test"))
    })
}

/// Collects the paths a module's items name: `use` trees (each leaf) and paths in
/// code with two or more segments.
#[derive(Default)]
struct Names {
    found: Vec<ModPath>,
}

impl Names {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.found.push(full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.found.push(full);
            }
            syn::UseTree::Glob(_) => self.found.push(prefix.clone()),
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Names {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_item_mod(&mut self, _: &'ast syn::ItemMod) {
        // Modules nested in items (rare) are walked by `Tree::items`, not here.
    }

    fn visit_item_fn(&mut self, item: &'ast syn::ItemFn) {
        if !cfg_test(&item.attrs) {
            syn::visit::visit_item_fn(self, item);
        }
    }

    fn visit_impl_item_fn(&mut self, item: &'ast syn::ImplItemFn) {
        if !cfg_test(&item.attrs) {
            syn::visit::visit_impl_item_fn(self, item);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        if path.segments.len() >= 2 {
            self.found
                .push(path.segments.iter().map(|s| s.ident.to_string()).collect());
        }
        syn::visit::visit_path(self, path);
    }
}

/// Tarjan's strongly connected components, each sorted.
fn strongly_connected<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    struct State<'a> {
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        groups: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(node: &'a str, graph: &BTreeMap<&'a str, BTreeSet<&'a str>>, s: &mut State<'a>) {
        let i = s.index.len();
        s.index.insert(node, i);
        s.low.insert(node, i);
        s.stack.push(node);
        s.on_stack.insert(node);
        for &next in &graph[node] {
            if !s.index.contains_key(next) {
                visit(next, graph, s);
                let low = s.low[node].min(s.low[next]);
                s.low.insert(node, low);
            } else if s.on_stack.contains(next) {
                let low = s.low[node].min(s.index[next]);
                s.low.insert(node, low);
            }
        }
        if s.low[node] == s.index[node] {
            let mut group = Vec::new();
            while let Some(top) = s.stack.pop() {
                s.on_stack.remove(top);
                group.push(top);
                if top == node {
                    break;
                }
            }
            group.sort_unstable();
            s.groups.push(group);
        }
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        groups: Vec::new(),
    };
    for &node in graph.keys() {
        if !state.index.contains_key(node) {
            visit(node, graph, &mut state);
        }
    }
    state.groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join("c/src").join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        dir
    }

    fn cycles(files: &[(&str, &str)]) -> Vec<String> {
        let dir = crate_with(files);
        check(&[("c".to_owned(), dir.path().join("c/src/lib.rs"))]).unwrap()
    }

    #[test]
    fn a_path_attribute_module_is_read_from_where_it_points() {
        // `shared/ring.rs` uses `crate::a`, which uses the module it became: a cycle found
        // only if the `#[path]` file was read.
        let found = cycles(&[
            ("lib.rs", "mod a; #[path = \"shared/ring.rs\"] mod b;"),
            ("a.rs", "pub struct A(crate::b::B);"),
            (
                "shared/ring.rs",
                "pub struct B; fn f() { let _ = crate::a::A; }",
            ),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("{crate::a, crate::b}"), "{found:?}");
    }

    #[test]
    fn siblings_that_use_each_other_are_a_cycle() {
        let found = cycles(&[
            ("lib.rs", "mod kernel; mod pinning;"),
            ("kernel.rs", "use crate::pinning::Pins; pub struct Kernel;"),
            ("pinning.rs", "pub struct Pins(crate::kernel::Kernel);"),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("{crate::kernel, crate::pinning}"),
            "{found:?}"
        );
        assert!(
            found[0].contains("crate::kernel uses crate::pinning::Pins"),
            "{found:?}"
        );
    }

    #[test]
    fn a_three_module_ring_through_nested_modules_is_a_cycle() {
        let found = cycles(&[
            ("lib.rs", "mod server;"),
            ("server/mod.rs", "mod auth; mod error; mod store;"),
            ("server/auth.rs", "use super::error::E;"),
            ("server/error.rs", "use super::store::sql::S; pub struct E;"),
            ("server/store/mod.rs", "pub mod sql;"),
            (
                "server/store/sql.rs",
                "pub struct S; fn f() { let _ = crate::server::auth::check(); }",
            ),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0]
                .contains("{crate::server::auth, crate::server::error, crate::server::store::sql}"),
            "{found:?}"
        );
    }

    #[test]
    fn parents_children_tests_and_external_crates_are_not_cycles() {
        let found = cycles(&[
            ("lib.rs", "mod a; mod b; use a::A; pub use b::*;"),
            (
                "a.rs",
                "mod inner; use crate::b::B; use super::A as _; pub struct A; use std::fmt;",
            ),
            (
                "a/inner.rs",
                "use super::super::a::A; use crate::a::A as X;",
            ),
            (
                "b.rs",
                "pub struct B; #[cfg(test)] mod tests { use crate::a::A; }",
            ),
        ]);
        assert!(found.is_empty(), "{found:?}");
    }
}
