// The node's GPUs on a machine without any: a device plugin, over the kubelet's real device-plugin gRPC API,
// that advertises N devices of a resource (nvidia.com/gpu) with nothing behind them. The scheduler counts
// them and the kubelet allocates them to containers as it would real ones; a container learns which it got
// from LOCALCLUSTER_FAKE_GPUS, and sees no device node (a CPU machine has none to give).
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type fakeGPUs struct {
	pluginapi.UnimplementedDevicePluginServer
	devices []*pluginapi.Device
}

func (f *fakeGPUs) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (f *fakeGPUs) ListAndWatch(_ *pluginapi.Empty, stream grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: f.devices}); err != nil {
		return err
	}
	<-stream.Context().Done() // the devices never change
	return nil
}

func (f *fakeGPUs) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{"LOCALCLUSTER_FAKE_GPUS": strings.Join(c.DevicesIds, ",")},
		})
	}
	return resp, nil
}

func (f *fakeGPUs) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

// serve listens on the plugin's socket and registers it with the kubelet; it returns when the socket is
// removed, which is what a restarting kubelet does to every plugin's socket (the plugin then registers anew).
func serve(pluginDir, resource string, count int) error {
	socket := filepath.Join(pluginDir, "localcluster-fake-gpu.sock")
	_ = os.Remove(socket)
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	plugin := &fakeGPUs{}
	for i := 0; i < count; i++ {
		plugin.devices = append(plugin.devices, &pluginapi.Device{ID: fmt.Sprintf("fake-gpu-%d", i), Health: pluginapi.Healthy})
	}
	server := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(server, plugin)
	go func() { _ = server.Serve(lis) }()
	defer server.Stop()

	conn, err := grpc.NewClient("unix://"+filepath.Join(pluginDir, "kubelet.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version: pluginapi.Version, Endpoint: filepath.Base(socket), ResourceName: resource,
	})
	cancel()
	conn.Close()
	if err != nil {
		return fmt.Errorf("registering with the kubelet: %w", err)
	}
	fmt.Fprintf(os.Stderr, "fake-gpu-plugin: registered %d x %s\n", count, resource)
	for {
		time.Sleep(time.Second)
		if _, err := os.Stat(socket); err != nil {
			return nil
		}
	}
}

func newFakeGPUCommand() *cobra.Command {
	var pluginDir, resource string
	var count int
	cmd := &cobra.Command{
		Use:   "fake-gpu-plugin",
		Short: "Advertise GPUs with no hardware behind them to the kubelet (a CPU machine's stand-in)",
		RunE: func(*cobra.Command, []string) error {
			for {
				if err := serve(pluginDir, resource, count); err != nil {
					fmt.Fprintf(os.Stderr, "fake-gpu-plugin: %v; trying again\n", err)
				}
				time.Sleep(time.Second) // the kubelet is restarting: register once its socket is back
			}
		},
	}
	cmd.Flags().StringVar(&pluginDir, "plugin-dir", pluginapi.DevicePluginPath, "the kubelet's device-plugin folder")
	cmd.Flags().StringVar(&resource, "resource", "nvidia.com/gpu", "extended resource name to advertise")
	cmd.Flags().IntVar(&count, "count", 2, "how many devices")
	return cmd
}
