package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// The worked session of docs/protocol.md is run as written: its commands
// are read from the markdown, run with the Mosquitto clients and kubectl
// against a broker and the operator, and what they print is compared with
// what the document shows. The structure this relies on is described in
// the section itself ("This session is a test").

const (
	docSessionFile    = "docs/protocol.md"
	docSessionHeading = "## A worked session with"
	// docBrokerArgs is how the session's commands name the broker; the test
	// points them at its own.
	docBrokerArgs = "-h localhost -p 1883"
)

func TestDocSession(t *testing.T) {
	steps, err := parseDocSection(docSessionFile, docSessionHeading)
	if err != nil {
		t.Fatal(err)
	}
	forEachBroker(t, func(t *testing.T, kind brokerKind) {
		ns, op := setup(t, kind)
		host, port := splitAddr(t, op.brokerAddr)
		r := newDocRunner(t, ns, "-h "+host+" -p "+port)
		for _, st := range steps {
			r.run(st)
		}
	})
}

// docStep is one thing the session shows: a command with what it prints,
// or (cmd == "") lines the running mosquitto_sub prints next.
type docStep struct {
	file   string
	line   int // of the command, or of the first output line
	cmd    string
	output []string
	yaml   string // the last YAML block before the step
}

func (s docStep) where() string { return fmt.Sprintf("%s:%d", s.file, s.line) }

var (
	fenceRE      = regexp.MustCompile("^```\\s*(\\S*)")
	assignmentRE = regexp.MustCompile(`^([A-Za-z_][A-Za-z0-9_]*)=('[^']*'|"[^"]*"|\S*)$`)
	mosquittoRE  = regexp.MustCompile(`mosquitto_(pub|sub|rr)\b`)
	placeholder  = regexp.MustCompile(`<[a-z][a-z0-9-]*>`)
)

// parseDocSection extracts the steps of a section of a file of the
// repository: the console blocks between the heading (a prefix of its
// line) and the next level-2 heading.
func parseDocSection(file, heading string) ([]docStep, error) {
	b, err := os.ReadFile(filepath.Join(repoRoot, file))
	if err != nil {
		return nil, err
	}
	return parseDocSectionText(file, heading, string(b))
}

func parseDocSectionText(file, heading, text string) ([]docStep, error) {
	lines := strings.Split(text, "\n")
	start := -1
	for i, l := range lines {
		if strings.HasPrefix(l, heading) {
			start = i + 1
			break
		}
	}
	if start < 0 {
		return nil, fmt.Errorf("%s: no section %q", file, heading)
	}
	var (
		steps    []docStep
		lastYAML string
	)
	for i := start; i < len(lines); i++ {
		if strings.HasPrefix(lines[i], "## ") {
			break
		}
		m := fenceRE.FindStringSubmatch(lines[i])
		if m == nil {
			continue
		}
		lang, open := m[1], i+1
		end := open
		for end < len(lines) && !strings.HasPrefix(lines[end], "```") {
			end++
		}
		if end == len(lines) {
			return nil, fmt.Errorf("%s:%d: the block is not closed", file, i+1)
		}
		block := lines[open:end]
		i = end
		switch lang {
		case "yaml":
			lastYAML = strings.Join(block, "\n") + "\n"
		case "console":
			bs, err := parseConsoleBlock(file, block, open+1, lastYAML)
			if err != nil {
				return nil, err
			}
			steps = append(steps, bs...)
		}
	}
	if len(steps) == 0 {
		return nil, fmt.Errorf("%s: the section %q has no console block", file, heading)
	}
	return steps, nil
}

// parseConsoleBlock parses one console block whose first line is line
// first of the file.
func parseConsoleBlock(file string, block []string, first int, yaml string) ([]docStep, error) {
	if len(block) == 0 {
		return nil, fmt.Errorf("%s:%d: empty console block", file, first)
	}
	if !strings.HasPrefix(block[0], "$ ") {
		for j, l := range block {
			if strings.HasPrefix(l, "$ ") {
				return nil, fmt.Errorf("%s:%d: a console block is either output of terminal 1 or starts with a command; this one has a command after output", file, first+j)
			}
		}
		return []docStep{{file: file, line: first, output: block}}, nil
	}
	var steps []docStep
	for j := 0; j < len(block); j++ {
		l := block[j]
		if !strings.HasPrefix(l, "$ ") {
			steps[len(steps)-1].output = append(steps[len(steps)-1].output, l)
			continue
		}
		st := docStep{file: file, line: first + j, cmd: strings.TrimPrefix(l, "$ "), yaml: yaml}
		for strings.HasSuffix(st.cmd, `\`) && j+1 < len(block) {
			j++
			st.cmd += "\n" + block[j]
		}
		steps = append(steps, st)
	}
	return steps, nil
}

// matchLine reports whether got is the line the document shows, with its
// <word> placeholders standing for any value without spaces.
func matchLine(want, got string) bool {
	var re strings.Builder
	re.WriteString("^")
	last := 0
	for _, loc := range placeholder.FindAllStringIndex(want, -1) {
		re.WriteString(regexp.QuoteMeta(want[last:loc[0]]))
		re.WriteString(`\S+`)
		last = loc[1]
		// A table column is as wide as its widest value: the spaces after
		// a value that varies vary too.
		if n := len(want[last:]) - len(strings.TrimLeft(want[last:], " ")); n > 0 {
			re.WriteString(` +`)
			last += n
		}
	}
	re.WriteString(regexp.QuoteMeta(want[last:]))
	re.WriteString("$")
	return regexp.MustCompile(re.String()).MatchString(got)
}

// docRunner runs the steps of the session in one test.
type docRunner struct {
	t          *testing.T
	ns         string
	dir        string // working directory of the commands
	env        []string
	brokerArgs string
	vars       []string // shell variable assignments so far
	varValues  map[string]string
	term1      *lineCollector
	term1Seen  int // lines of terminal 1 already compared
	twins      []string
}

func newDocRunner(t *testing.T, ns, brokerArgs string) *docRunner {
	t.Helper()
	dir := t.TempDir()
	// kubectl in the test's namespace, as "pointed at the namespace the
	// operator serves" says.
	cfg, err := clientcmd.LoadFromFile(kubeconfigPath)
	if err != nil {
		t.Fatal(err)
	}
	ctx := cfg.Contexts[cfg.CurrentContext]
	if ctx == nil {
		t.Fatalf("%s has no current context", kubeconfigPath)
	}
	ctx.Namespace = ns
	kc := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, kc); err != nil {
		t.Fatal(err)
	}
	// kubectl-twin is found as a kubectl plugin on the PATH.
	path := strings.Join([]string{filepath.Dir(mosquittoPubBin), filepath.Dir(mosquittoSubBin), os.Getenv("KUBEBUILDER_ASSETS"), filepath.Dir(pluginBin), "/usr/bin", "/bin"}, ":")
	r := &docRunner{
		t: t, ns: ns, dir: dir, brokerArgs: brokerArgs, varValues: map[string]string{},
		env: []string{"PATH=" + path, "HOME=" + dir, "KUBECONFIG=" + kc, "LC_ALL=C"},
	}
	// The twins the session creates are deleted while the operator still
	// runs (cleanups run last-in first-out), so that it releases their
	// device ids.
	t.Cleanup(r.deleteTwins)
	return r
}

func (r *docRunner) run(st docStep) {
	r.t.Helper()
	if st.cmd == "" {
		r.expectTerminal1(st)
		return
	}
	cmd, err := r.prepare(st)
	if err != nil {
		r.t.Fatalf("%s: %v", st.where(), err)
	}
	if m := assignmentRE.FindStringSubmatch(cmd); m != nil {
		if len(st.output) > 0 {
			r.t.Fatalf("%s: an assignment prints nothing, but the document shows output", st.where())
		}
		r.vars = append(r.vars, cmd)
		r.varValues[m[1]] = strings.Trim(m[2], `'"`)
		return
	}
	switch r.program(cmd) {
	case "mosquitto_sub":
		if r.term1 != nil {
			r.t.Fatalf("%s: a second mosquitto_sub; the session has one terminal 1", st.where())
		}
		r.term1 = r.start(st, cmd)
		if len(st.output) > 0 {
			r.expectTerminal1(docStep{file: st.file, line: st.line + 1, output: st.output})
		}
	case "mosquitto_pub", "mosquitto_rr", "kubectl":
		r.runCommand(st, cmd)
	default:
		r.t.Fatalf("%s: the session test runs only mosquitto_pub, mosquitto_sub, mosquitto_rr, kubectl and variable assignments, not %q", st.where(), cmd)
	}
}

// prepare checks a command and points it at the test's broker.
func (r *docRunner) prepare(st docStep) (string, error) {
	cmd := st.cmd
	for _, loc := range mosquittoRE.FindAllStringIndex(cmd, -1) {
		if !strings.HasPrefix(cmd[loc[1]:], " "+docBrokerArgs+" ") {
			return "", fmt.Errorf("%s must be followed by %q, which the test points at its own broker", cmd[loc[0]:loc[1]], docBrokerArgs)
		}
	}
	if strings.HasPrefix(cmd, "kubectl apply -f ") {
		file := strings.TrimSpace(strings.TrimPrefix(cmd, "kubectl apply -f "))
		if st.yaml == "" || strings.ContainsAny(file, "/ ") {
			return "", fmt.Errorf("kubectl apply -f %s needs the YAML block before it (and a plain file name)", file)
		}
		if err := os.WriteFile(filepath.Join(r.dir, file), []byte(st.yaml), 0o600); err != nil {
			return "", err
		}
		r.twins = append(r.twins, strings.TrimSuffix(file, filepath.Ext(file)))
	}
	return strings.ReplaceAll(cmd, docBrokerArgs, r.brokerArgs), nil
}

// program is the program a command runs, after the session's variables.
func (r *docRunner) program(cmd string) string {
	first, _, _ := strings.Cut(cmd, " ")
	if strings.HasPrefix(first, "$") {
		first, _, _ = strings.Cut(r.varValues[strings.TrimPrefix(first, "$")], " ")
	}
	return first
}

// shell is bash running cmd after the session's assignments.
func (r *docRunner) shell(ctx context.Context, cmd string) *exec.Cmd {
	script := strings.Join(append(append([]string(nil), r.vars...), "exec "+cmd), "\n")
	c := exec.CommandContext(ctx, "/bin/bash", "-c", script)
	c.Dir, c.Env = r.dir, r.env
	return c
}

// runCommand runs a command to its end and compares what it prints.
func (r *docRunner) runCommand(st docStep, cmd string) {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), commandWait)
	defer cancel()
	c := r.shell(ctx, cmd)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	r.t.Logf("%s: $ %s", st.where(), cmd)
	if err := c.Run(); err != nil {
		r.t.Fatalf("%s: $ %s\nfailed: %v\nstdout: %s\nstderr: %s", st.where(), cmd, err, stdout.String(), stderr.String())
	}
	got := splitOutput(stdout.String())
	ok := len(got) == len(st.output)
	for i := 0; ok && i < len(got); i++ {
		ok = matchLine(st.output[i], got[i])
	}
	if !ok {
		r.t.Fatalf("%s: $ %s\nprinted:\n%s\nbut the document shows:\n%s", st.where(), cmd, indent(got), indent(st.output))
	}
}

// start runs the mosquitto_sub of terminal 1 until the test ends.
func (r *docRunner) start(st docStep, cmd string) *lineCollector {
	r.t.Helper()
	c := r.shell(context.Background(), cmd)
	lc := &lineCollector{changed: make(chan struct{})}
	stdout, err := c.StdoutPipe()
	if err != nil {
		r.t.Fatal(err)
	}
	c.Stderr = &lockedWriter{mu: &lc.mu, w: &lc.stderr}
	r.t.Logf("%s: $ %s &", st.where(), cmd)
	if err := c.Start(); err != nil {
		r.t.Fatalf("%s: %v", st.where(), err)
	}
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			lc.add(sc.Text(), false)
		}
		_ = c.Wait()
		lc.add("", true)
	}()
	r.t.Cleanup(func() {
		// Ctrl-C, as the document says.
		_ = c.Process.Signal(syscall.SIGINT)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = c.Process.Kill()
			<-exited
		}
	})
	return lc
}

// expectTerminal1 waits for the next lines of terminal 1 and compares them,
// in any order, with the lines the document shows.
func (r *docRunner) expectTerminal1(st docStep) {
	r.t.Helper()
	if r.term1 == nil {
		r.t.Fatalf("%s: output of terminal 1 before any mosquitto_sub", st.where())
	}
	got, err := r.term1.waitLines(r.term1Seen+len(st.output), wait)
	if err != nil {
		r.t.Fatalf("%s: terminal 1 (mosquitto_sub): %v; it printed:\n%s\nthe document shows next:\n%s", st.where(), err, indent(got[r.term1Seen:]), indent(st.output))
	}
	next := got[r.term1Seen : r.term1Seen+len(st.output)]
	r.term1Seen += len(st.output)
	used := make([]bool, len(next))
	var missing []string
	for _, want := range st.output {
		found := false
		for i, g := range next {
			if !used[i] && matchLine(want, g) {
				used[i], found = true, true
				break
			}
		}
		if !found {
			missing = append(missing, want)
		}
	}
	if len(missing) > 0 {
		r.t.Fatalf("%s: terminal 1 (mosquitto_sub) printed:\n%s\nbut the document shows:\n%s\n(not printed: %s)", st.where(), indent(next), indent(st.output), strings.Join(missing, " | "))
	}
}

// deleteTwins deletes the twins the session applied and waits until the
// operator has released them.
func (r *docRunner) deleteTwins() {
	for _, name := range r.twins {
		tw := &v1alpha1.DeviceTwin{}
		key := client.ObjectKey{Namespace: r.ns, Name: name}
		if err := k8s.Get(context.Background(), key, tw); err != nil {
			if !apierrors.IsNotFound(err) {
				r.t.Errorf("reading DeviceTwin %s: %v", key, err)
			}
			continue
		}
		uid := tw.UID
		if err := k8s.Delete(context.Background(), tw); err != nil && !apierrors.IsNotFound(err) {
			r.t.Errorf("deleting DeviceTwin %s: %v", key, err)
			continue
		}
		deadline := time.Now().Add(wait)
		for {
			now := &v1alpha1.DeviceTwin{}
			err := k8s.Get(context.Background(), key, now)
			if apierrors.IsNotFound(err) {
				break
			}
			if err == nil && now.UID != uid {
				r.t.Errorf("DeviceTwin %s was created again after its deletion (uid %s, then %s, spec %+v, managed by %v)",
					key, uid, now.UID, now.Spec, managers(now))
				break
			}
			if time.Now().After(deadline) {
				r.t.Errorf("DeviceTwin %s is still there %s after its deletion (err %v, finalizers %v)", key, wait, err, now.Finalizers)
				break
			}
			time.Sleep(tick)
		}
	}
}

// managers lists who wrote an object.
func managers(o *v1alpha1.DeviceTwin) []string {
	var m []string
	for _, f := range o.ManagedFields {
		m = append(m, f.Manager+"/"+string(f.Operation))
	}
	return m
}

// lineCollector holds what a background command printed.
type lineCollector struct {
	mu      sync.Mutex
	lines   []string
	stderr  bytes.Buffer
	done    bool
	changed chan struct{} // closed and replaced on every line and at exit
}

func (l *lineCollector) add(line string, exited bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if exited {
		l.done = true
	} else {
		l.lines = append(l.lines, line)
	}
	close(l.changed)
	l.changed = make(chan struct{})
}

// waitLines waits until n lines were printed and returns all of them.
func (l *lineCollector) waitLines(n int, d time.Duration) ([]string, error) {
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	for {
		l.mu.Lock()
		lines, done, ch := append([]string(nil), l.lines...), l.done, l.changed
		stderr := l.stderr.String()
		l.mu.Unlock()
		if len(lines) >= n {
			return lines, nil
		}
		if done {
			return lines, fmt.Errorf("it exited (stderr: %q)", stderr)
		}
		select {
		case <-ch:
		case <-deadline.C:
			return lines, fmt.Errorf("%d line(s) missing after %s", n-len(lines), d)
		}
	}
}

func splitOutput(s string) []string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

func indent(lines []string) string {
	if len(lines) == 0 {
		return "    (nothing)"
	}
	return "    " + strings.Join(lines, "\n    ")
}

// The extractor itself: placeholders, and the block rules the document
// states.
func TestDocSessionParser(t *testing.T) {
	for _, c := range []struct {
		want, got string
		ok        bool
	}{
		{"a <age> b", "a 3s b", true},
		{"a <age> b", "a  b", false},
		{"a <age> b", "a 3 s b", false},
		{"a <age>   b", "a 13s b", true},
		{"a <age>   b", "a 13sb", false},
		{`{"$version":1}`, `{"$version":1}`, true},
		{`{"$version":1}`, `{"$version":2}`, false},
		{"x.y", "xzy", false},
	} {
		if got := matchLine(c.want, c.got); got != c.ok {
			t.Errorf("matchLine(%q, %q) = %v, want %v", c.want, c.got, got, c.ok)
		}
	}
	doc := "## A worked session with x\n```yaml\nkind: X\n```\n```console\n$ a \\\n  b\nout1\n$ c\n```\n```console\nt1\nt2\n```\n## Next\n```console\n$ ignored\n```\n"
	steps, err := parseDocSectionText("x.md", docSessionHeading, doc)
	if err != nil {
		t.Fatal(err)
	}
	want := []docStep{
		{file: "x.md", line: 6, cmd: "a \\\n  b", output: []string{"out1"}, yaml: "kind: X\n"},
		{file: "x.md", line: 9, cmd: "c", yaml: "kind: X\n"},
		{file: "x.md", line: 12, output: []string{"t1", "t2"}},
	}
	if fmt.Sprint(steps) != fmt.Sprint(want) {
		t.Errorf("steps:\n%v\nwant\n%v", steps, want)
	}
	if _, err := parseDocSectionText("x.md", docSessionHeading, "## A worked session with x\n```console\nout\n$ cmd\n```\n"); err == nil {
		t.Error("a command after output was accepted")
	}
	if _, err := parseDocSectionText("x.md", docSessionHeading, "## A worked session with x\n```console\n$ cmd\n"); err == nil {
		t.Error("an unclosed block was accepted")
	}
}
