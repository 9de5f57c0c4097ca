{{/* Names: the release's, so that two releases in one cluster would not collide. */}}
{{- define "podwire.fullname" -}}
{{- if contains "podwire" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-podwire" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "podwire.selectorLabels" -}}
app.kubernetes.io/name: podwire
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "podwire.labels" -}}
{{ include "podwire.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "podwire.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Where the probes reach the agent's HTTP server: loopback when it listens on every address
or on loopback, its own address otherwise. */}}
{{- define "podwire.probeHost" -}}
{{- if has .Values.http.address (list "0.0.0.0" "127.0.0.1") -}}
127.0.0.1
{{- else -}}
{{- .Values.http.address -}}
{{- end -}}
{{- end -}}

{{/* The agent's socket, the same path on the node (for the plugin) and in its container. */}}
{{- define "podwire.socket" -}}
/run/podwire/agent.sock
{{- end -}}

{{/* Values the agent or the plugin would reject, refused at install instead. */}}
{{- define "podwire.validate" -}}
{{- if not (has (toString .Values.cniVersion) (list "0.4.0" "1.0.0" "1.1.0")) -}}
{{- fail (printf "cniVersion %v: podwire-cni speaks 0.4.0, 1.0.0 and 1.1.0" .Values.cniVersion) -}}
{{- end -}}
{{- if not (regexMatch "^([0-9]{1,3}\\.){3}[0-9]{1,3}/[0-9]{1,2}$" (toString .Values.clusterCIDR)) -}}
{{- fail (printf "clusterCIDR %v is not an IPv4 CIDR such as 10.244.0.0/16" .Values.clusterCIDR) -}}
{{- end -}}
{{- $vni := int64 .Values.vni -}}
{{- if or (lt $vni 1) (gt $vni 16777215) -}}
{{- fail (printf "vni %v: a VXLAN network identifier is 1 to 16777215" .Values.vni) -}}
{{- end -}}
{{- $port := int64 .Values.vxlanPort -}}
{{- if or (lt $port 1) (gt $port 65535) -}}
{{- fail (printf "vxlanPort %v: a UDP port is 1 to 65535" .Values.vxlanPort) -}}
{{- end -}}
{{- if not (has (toString .Values.routing) (list "tunnel" "native")) -}}
{{- fail (printf "routing %v: tunnel or native" .Values.routing) -}}
{{- end -}}
{{- if not (has (toString .Values.encap) (list "bpf" "device")) -}}
{{- fail (printf "encap %v: bpf or device" .Values.encap) -}}
{{- end -}}
{{- $mtu := int64 .Values.mtu -}}
{{- if and (ne $mtu 0) (or (lt $mtu 576) (gt $mtu 65535)) -}}
{{- fail (printf "mtu %v: 0 (derived on each node) or 576 to 65535" .Values.mtu) -}}
{{- end -}}
{{- end -}}
