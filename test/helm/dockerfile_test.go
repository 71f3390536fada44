package helm

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// No container engine runs here, so the image is checked without one:
// what the Dockerfile copies covers every package of cmd/manager, its go
// build command (run here as written) gives a static binary, and the
// final stage runs that binary as the non-root user, exposing the ports
// the chart's Deployment uses.

// dockerfile is the Dockerfile's instructions, continuation lines joined.
func dockerfile(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	var cur strings.Builder
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if cur.Len() == 0 && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if s, ok := strings.CutSuffix(line, "\\"); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(line)
		out = append(out, cur.String())
		cur.Reset()
	}
	return out
}

func TestDockerfileBuildsTheManager(t *testing.T) {
	ins := dockerfile(t)
	root := repoRoot()

	// The build stage's COPYs hold every package of this module that the
	// manager needs.
	var copied []string
	var build string
	for _, in := range ins {
		f := strings.Fields(in)
		switch {
		case f[0] == "COPY" && !strings.HasPrefix(f[1], "--from"):
			for _, src := range f[1 : len(f)-1] {
				copied = append(copied, strings.TrimSuffix(src, "/"))
			}
		case f[0] == "RUN" && strings.Contains(in, "go build"):
			build = in[strings.Index(in, "CGO_ENABLED"):]
		}
	}
	list := exec.Command("go", "list", "-deps", "-f", "{{if .Module}}{{if .Module.Main}}{{.Dir}}{{end}}{{end}}", "./cmd/manager")
	list.Dir = root
	out, err := list.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dir := range strings.Fields(string(out)) {
		rel, _ := filepath.Rel(root, dir)
		top := strings.Split(rel, string(filepath.Separator))[0]
		if !slices.Contains(copied, top) {
			t.Errorf("package %s is not in what the Dockerfile copies (%v)", rel, copied)
		}
	}
	for _, f := range []string{"go.mod", "go.sum"} {
		if !slices.Contains(copied, f) {
			t.Errorf("the Dockerfile does not copy %s", f)
		}
	}

	// Its go build, run as written (the platform variables as a linux/amd64
	// build sets them), makes a static executable.
	if build == "" {
		t.Fatal("no RUN ... go build in the Dockerfile")
	}
	bin := filepath.Join(t.TempDir(), "manager")
	cmdline := strings.NewReplacer("${TARGETOS:-linux}", "linux", "${TARGETARCH}", "amd64", "/out/manager", bin).Replace(build)
	cmd := exec.Command("sh", "-c", cmdline)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", cmdline, err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the manager binary needs a dynamic loader; distroless/static has none")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("the manager binary links %v", libs)
	}
}

func TestDockerfileFinalStage(t *testing.T) {
	ins := dockerfile(t)
	last := 0
	for i, in := range ins {
		if strings.HasPrefix(in, "FROM ") {
			last = i
		}
	}
	final := ins[last:]
	want := map[string]*regexp.Regexp{
		"base":       regexp.MustCompile(`^FROM gcr\.io/distroless/static(-debian\d+)?:nonroot$`),
		"binary":     regexp.MustCompile(`^COPY --from=builder /out/manager /manager$`),
		"user":       regexp.MustCompile(`^USER 65532:65532$`),
		"entrypoint": regexp.MustCompile(`^ENTRYPOINT \["/manager"\]$`),
	}
	for what, re := range want {
		if !slices.ContainsFunc(final, re.MatchString) {
			t.Errorf("final stage lacks the %s (%s):\n%s", what, re, strings.Join(final, "\n"))
		}
	}
	// Every port the chart's container declares.
	var exposed []string
	for _, in := range final {
		if f := strings.Fields(in); f[0] == "EXPOSE" {
			exposed = append(exposed, f[1:]...)
		}
	}
	for _, p := range []string{"8883", "1883", "8081", "8443", "9443", "10443"} {
		if !slices.Contains(exposed, p) {
			t.Errorf("EXPOSE %v lacks %s", exposed, p)
		}
	}
}
