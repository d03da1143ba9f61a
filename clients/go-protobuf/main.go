// Command krate-go-client drives a krate server with client-go's typed clients over
// protobuf, as the controller manager and most operators do, and says what it got.
//
//	krate-go-client check KUBECONFIG NAMESPACE   verbs, errors and a watch over protobuf
//	krate-go-client bench KUBECONFIG NAMESPACE N list and watch N pods, protobuf vs JSON
//
// It is the project's own test client; the tests build it with `go build` (client-go
// comes from the Go module proxy).
package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

const protobuf = "application/vnd.kubernetes.protobuf"

// seen records the Content-Type of every answer, per request line.
type seen struct {
	mu    sync.Mutex
	types map[string]string
	next  http.RoundTripper
}

func (s *seen) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := s.next.RoundTrip(req)
	if err == nil {
		key := req.Method + " " + req.URL.Path
		if req.URL.Query().Get("watch") == "true" {
			key = "WATCH " + req.URL.Path
		}
		s.mu.Lock()
		s.types[key] = resp.Header.Get("Content-Type")
		s.mu.Unlock()
	}
	return resp, err
}

func clientset(kubeconfig string, proto bool, recorder *seen) *kubernetes.Clientset {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	must(err)
	cfg.QPS, cfg.Burst = 1000, 1000
	if proto {
		cfg.ContentType = protobuf
		cfg.AcceptContentTypes = protobuf + ",application/json"
	}
	if recorder != nil {
		cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { recorder.next = rt; return recorder })
	}
	return kubernetes.NewForConfigOrDie(cfg)
}

func must(err error) {
	if err != nil {
		fail("%v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "FAIL: "+format+"\n", args...)
	os.Exit(1)
}

func pod(name string) *corev1.Pod {
	grace := int64(0)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "proto"}},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: &grace,
			// No node matches: the pods stay pending, as written.
			NodeSelector: map[string]string{"krate.dev/no-such-node": "true"},
			Containers: []corev1.Container{{
				Name: "c", Image: "busybox", Command: []string{"sleep", "3600"},
				Ports: []corev1.ContainerPort{{ContainerPort: 80, Name: "http"}},
			}},
		},
	}
}

func check(kubeconfig, ns string) {
	ctx := context.Background()
	recorder := &seen{types: map[string]string{}}
	c := clientset(kubeconfig, true, recorder)
	pods := c.CoreV1().Pods(ns)

	created, err := pods.Create(ctx, pod("proto-a"), metav1.CreateOptions{})
	must(err)
	if created.UID == "" || created.Spec.Containers[0].Ports[0].ContainerPort != 80 {
		fail("the created pod came back incomplete: %+v", created)
	}
	got, err := pods.Get(ctx, "proto-a", metav1.GetOptions{})
	must(err)
	if got.Spec.Containers[0].Command[1] != "3600" || got.CreationTimestamp.IsZero() {
		fail("the pod read back differs: %+v", got.Spec)
	}
	list, err := pods.List(ctx, metav1.ListOptions{LabelSelector: "app=proto"})
	must(err)
	if len(list.Items) != 1 || list.ResourceVersion == "" {
		fail("the list holds %d pods at resourceVersion %q", len(list.Items), list.ResourceVersion)
	}

	w, err := pods.Watch(ctx, metav1.ListOptions{ResourceVersion: list.ResourceVersion, AllowWatchBookmarks: true})
	must(err)
	patch := []byte(`{"metadata":{"labels":{"step":"patched"}}}`)
	_, err = pods.Patch(ctx, "proto-a", types.MergePatchType, patch, metav1.PatchOptions{})
	must(err)
	// Other writers (the scheduler's status) may modify the pod first: every event must
	// be a decoded pod or a bookmark, and the patched pod must come.
	deadline := time.After(20 * time.Second)
	for patched := false; !patched; {
		select {
		case ev := <-w.ResultChan():
			p, ok := ev.Object.(*corev1.Pod)
			switch {
			case ev.Type == watch.Bookmark:
			case ev.Type != watch.Modified || !ok:
				fail("the watch sent %s %T instead of a modified pod", ev.Type, ev.Object)
			default:
				patched = p.Labels["step"] == "patched"
			}
		case <-deadline:
			fail("the watch sent no patched pod within 20s")
		}
	}
	w.Stop()

	_, err = pods.Get(ctx, "missing", metav1.GetOptions{})
	if !apierrors.IsNotFound(err) || err.Error() != `pods "missing" not found` {
		fail("a missing pod gave %v", err)
	}
	_, err = pods.Create(ctx, pod("proto-a"), metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		fail("a second create gave %v", err)
	}
	must(pods.Delete(ctx, "proto-a", metav1.DeleteOptions{}))

	recorder.mu.Lock()
	defer recorder.mu.Unlock()
	keys := make([]string, 0, len(recorder.types))
	for k := range recorder.types {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Printf("%s -> %s\n", k, recorder.types[k])
	}
}

// bench lists and watches n pods with protobuf and with JSON, alternating rounds, and
// prints each round's time.
func bench(kubeconfig, ns string, n, rounds int) {
	ctx := context.Background()
	setup := clientset(kubeconfig, true, nil)
	existing, err := setup.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	must(err)
	if len(existing.Items) < n {
		var wg sync.WaitGroup
		work := make(chan int)
		for w := 0; w < 16; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range work {
					_, err := setup.CoreV1().Pods(ns).Create(ctx, pod("bench-"+strconv.Itoa(i)), metav1.CreateOptions{})
					if err != nil && !apierrors.IsAlreadyExists(err) {
						fail("creating pod %d: %v", i, err)
					}
				}
			}()
		}
		for i := 0; i < n; i++ {
			work <- i
		}
		close(work)
		wg.Wait()
	}
	for round := 0; round < rounds; round++ {
		for _, proto := range []bool{true, false} {
			c := clientset(kubeconfig, proto, nil)
			start := time.Now()
			list, err := c.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
			must(err)
			if len(list.Items) < n {
				fail("the list held %d of %d pods", len(list.Items), n)
			}
			listed := time.Since(start)

			start = time.Now()
			w, err := c.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{ResourceVersion: "0"})
			must(err)
			got := 0
			for got < n {
				ev, ok := <-w.ResultChan()
				if !ok {
					fail("the watch closed after %d of %d events", got, n)
				}
				if ev.Type != watch.Added {
					fail("the watch sent %s (%v) where an ADDED pod was due", ev.Type, ev.Object)
				}
				got++
			}
			w.Stop()
			watched := time.Since(start)
			encoding := "json"
			if proto {
				encoding = "protobuf"
			}
			fmt.Printf("round=%d encoding=%s list_ms=%.1f watch_ms=%.1f\n", round, encoding,
				float64(listed.Microseconds())/1e3, float64(watched.Microseconds())/1e3)
		}
	}
}

func main() {
	if len(os.Args) < 4 {
		fail("usage: krate-go-client check|bench KUBECONFIG NAMESPACE [PODS [ROUNDS]]")
	}
	switch os.Args[1] {
	case "check":
		check(os.Args[2], os.Args[3])
	case "bench":
		n, rounds := 10000, 5
		if len(os.Args) > 4 {
			n, _ = strconv.Atoi(os.Args[4])
		}
		if len(os.Args) > 5 {
			rounds, _ = strconv.Atoi(os.Args[5])
		}
		bench(os.Args[2], os.Args[3], n, rounds)
	default:
		fail("unknown command %q", os.Args[1])
	}
}
