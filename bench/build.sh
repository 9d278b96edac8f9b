# Sourced by the bench scripts: which shadowproxy build they measure.
#   bench_build_select   BENCH_BUILD=compiled (default: the data path compiled with mypyc,
#                        as the Docker image ships it) compiles a copy of the tree and exports
#                        SHADOWPROXY_BENCH_TREE for start_for_harness.sh; BENCH_BUILD=pure
#                        measures the pure-Python package. Sets bench_build.
#   bench_build_cleanup  removes the compiled copy.
bench_build_select() {
  bench_build="${BENCH_BUILD:-compiled}"
  bench_build_tree=""
  case $bench_build in
    compiled)
      bench_build_tree="$(mktemp -d /tmp/shadowproxy-bench-tree-XXXXXX)"
      bash "$root/tools/compiled-tree.sh" "$bench_build_tree/src" "$python" >/dev/null
      export SHADOWPROXY_BENCH_TREE="$bench_build_tree/src" ;;
    pure) unset SHADOWPROXY_BENCH_TREE ;;
    *) echo "BENCH_BUILD must be compiled or pure, not '$bench_build'" >&2; return 2 ;;
  esac
}

bench_build_cleanup() {
  [[ -z ${bench_build_tree:-} ]] || rm -rf "$bench_build_tree"
}
