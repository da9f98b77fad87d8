"""DenseNet's 3 x 3 convolution (128 -> 32 channels, batch 8) on XLA:CPU: forward, input gradient and
filter gradient of lax.conv against two matmul rewrites (im2col; 9 shifted matmuls), in ms.

    taskset -c 0 python benchmarks/conv3x3_grads.py
"""
import jax, jax.numpy as jnp, numpy as np, time, statistics
def med(f, n=7):
  f(); f(); ts=[]
  for _ in range(n):
    t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
  return 1e3*statistics.median(ts)
dn=('NHWC','HWIO','NHWC')
for s, c in ((56,128),(28,128),(14,128)):
  rs=np.random.RandomState(0)
  h=jnp.asarray(rs.randn(8,s,s,c).astype(np.float32)); w=jnp.asarray(rs.randn(3,3,c,32).astype(np.float32))
  conv=lambda h,w: jax.lax.conv_general_dilated(h,w,(1,1),((1,1),(1,1)),dimension_numbers=dn)
  def im2col(h,w):
    hp=jnp.pad(h,((0,0),(1,1),(1,1),(0,0)))
    p=jnp.concatenate([hp[:,i:i+s,j:j+s,:] for i in range(3) for j in range(3)],-1)
    return p @ w.reshape(9*c,32)
  def shifted(h,w):
    hp=jnp.pad(h,((0,0),(1,1),(1,1),(0,0)))
    return sum(hp[:,i:i+s,j:j+s,:] @ w[i,j] for i in range(3) for j in range(3))
  for name,f in (('lax.conv',conv),('im2col',im2col),('9 shifted matmuls',shifted)):
    L=lambda h,w: jnp.sum(f(h,w)*1.0001)
    gx=jax.jit(jax.grad(L,0)); gw=jax.jit(jax.grad(L,1)); fw=jax.jit(f)
    print(s, name, 'fwd %.1f dx %.1f dw %.1f ms'%(med(lambda: fw(h,w).block_until_ready()), med(lambda: gx(h,w).block_until_ready()), med(lambda: gw(h,w).block_until_ready())), flush=True)
